// CUDA kernels of gemm_4bit: out[M, N] = A[M, K] @ W[N, K]^T (+ bias), W in bitsandbytes' packed
// 4-bit format (NF4 / FP4, any blocksize, float32 or nested absmax decoded in registers).
//
// Four kernels and one fallback, chosen by shape in gemm_4bit_cuda (the dispatch, with the
// measurements behind it, is at kSkinnyAutoMaxM):
//  * skinny (M <= 32, or 24 on long K: kWgFromM; fp16/bf16, K % 32 == 0; forced, any M in slices of 32): streams W once. A
//    block owns 32 rows of W and its 8 warps take turns over K; packed W reaches shared memory by
//    cp.async in whole lines (a 4-stage ring inside the decode table's unused row halves), W is the
//    mma.sync A operand decoded through a per-lane byte -> pair table, the batch is the n side, and
//    with blocksize >= 64 the absmax scales each 64-wide group's float32 sums instead of every weight.
//  * warpgroup kernel (sm_90a, 32 < M <= 512, or 24 < M <= 1024 for K >= 8192): wgmma with W decoded
//    straight into the A registers, activations and packed W by TMA (issued by a producer warp at
//    batch tile 128), mbarriers (gemm_4bit_wgmma.cuh); one
//    block per tile, or stream-K over one block per SM where the tiles are few (wg_stream_k_pays),
//    or whole tiles for the full waves and stream-K over the last (wg_dp_stream_k_pays).
//  * tensor-core GEMM (32 < M <= kTcMaxM without sm_90): 128 x BM tiles, BK = 64, multi-stage cp.async of
//    activations and packed W; W is decoded once per tile into shared memory, ldmatrix feeds
//    mma.sync m16n8k16 with float32 accumulators.
//  * generic (any K, any dtype incl. float32, small M): one warp per output feature, element by
//    element, exact float32 decode.
//  * dequantize + cuBLAS (larger M, or shapes the others do not take): W dequantized to A's
//    dtype by the dequantize_4bit kernel itself (dequantize_4bit_into), then one at::mm / at::addmm.
// All offsets into W and A are 64-bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

#include "../gemm_4bit.h"
#include "common.cuh"
#include "dequantize_4bit.cuh"
#include "gemm_4bit_mma.cuh"
#include "gemm_4bit_wgmma.cuh"

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
  // The skinny kernel's folded path (FOLD) holds code * code_mul in its table and divides the scales
  // by it: FP4's codes times 6 are 0, 1/32, 1, 1.5, 2, 3, 4, 6, exact in fp16/bf16, while its codes
  // themselves (2/3, 1/3, 1/6, 1/192) all round one way (down in fp16, up in bf16), a bias of every
  // product that the float32 reference does not have and that no per-weight rounding averages out
  // when the scale multiplies a whole group's sum. 1 for NF4.
  float code_mul;
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

// Zero an accumulator array (any [A][B][4] tile of mma fragments).
template <int A, int B>
__device__ __forceinline__ void zero_tiles(float (&t)[A][B][4]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) t[a][b][e] = 0.0f;
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
// The same table, with the byte picked at run time: sel = 0x5504 | (byte << 4) puts byte `byte` of w
// next to lane8 = 8 l in a PRMT, which is v * 256 + 8 l, half of it the entry's offset.
__device__ __forceinline__ uint32_t lookup_sel(uint32_t tab, uint32_t lane8, uint32_t sel, uint32_t w) {
  uint32_t r;
  asm("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(tab + (__byte_perm(w, lane8, sel) >> 1)));
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
// Skinny kernel (small M; the host runs it over the batch in slices of at most 32 rows)
// =============================================================================================
// A block owns 32 rows of W; its 8 warps take turns over K in 64-wide groups (warp w: group w of
// every 512-wide stage). W is mma's A operand (two m16 tiles per warp), the batch its n side (NT n8
// tiles). mma's k order is free as long as both operands agree, so thread (g = lane / 4, c = lane % 4)
// takes, per group and row, the packed bytes [8c, 8c + 8) of the row's 32 (k = 16c .. 16c + 15), and
// step j (0..3) uses its bytes 2j and 2j + 1 (k = 16c + 4j .. + 3) against 4 contiguous activations.
// Then all 16 k of an mma step, and all 64 of the group, lie in one quantization block when
// blocksize >= 64 and K % 64 == 0 (UNIFORM): up to 16 rows (FOLD) the mma runs on the bare codes and
// the group's float32 partial sums are scaled by the block's absmax (the code's one rounding to T is
// all, as in cuBLAS on the dequantized weight, and no multiply per weight); otherwise every pair of
// codes is scaled before the mma.
//
// Decode: one shared-memory load turns a packed byte into its two codes (a T pair) from a per-lane
// table with 256-byte rows: entry v of lane l at byte v * 256 + 4 l, so the address is a single PRMT
// of the packed word and 4 l (no add when the table sits at shared address 0, as the kernel checks),
// and 32 lanes hit 32 distinct banks.
// Packed W: the block copies each 32 x 256-byte stage with cp.async, 16 contiguous bytes per thread
// (whole 128-byte lines per warp instruction), into a 4-stage ring that lives in the table rows'
// unused upper halves; one barrier per stage. (Loading each lane's 8-byte pieces straight from
// global memory cost 8 L1 wavefronts per 256 bytes: ncu showed the L1 data pipe, not DRAM, as the
// limit.) The stage's absmax values are decoded once by the block into a small shared table.
constexpr int kSkinnyAny = 0, kSkinnyUniform = 1, kSkinnyWhole = 2;  // skinny_main's MODE
constexpr int kSkinnyWarps = 8;
constexpr int kSkinnyRows = 32;                             // W rows per block
constexpr int kSkinnyGroup = 64;                            // k per warp per stage
constexpr int kSkinnyStageK = kSkinnyWarps * kSkinnyGroup;  // k per stage: 256 bytes of each row
constexpr int kSkinnyStages = 4;
constexpr int kSkinnyMaxM = 32;                             // batch rows per launch (NT <= 4)
constexpr int kWideTableBytes = 256 * 256;
constexpr uint32_t kSkinnyRingStride = 2 * kSkinnyRows * 256;  // 64 holes per stage
constexpr int kSkinnyScaleOffset = kWideTableBytes + 1024;      // scale tables, after code8
constexpr int kSkinnyScaleBytes = 2 * kSkinnyRows * (4 * kSkinnyWarps + 1) * 4;
static_assert(kSkinnyStages * kSkinnyRingStride == kWideTableBytes, "the ring fills the table's 256 holes");

// Byte offset, in the ring's stage 0, of a row, half of its 256 bytes, 32-byte slot in the half and
// 16-byte sub-chunk: the ring lives in the table's row holes (hole 2 row + half, at hole * 256 +
// 128), slots rotated by row so that the 4 rows a half-warp reads back hit distinct banks.
__host__ __device__ constexpr uint32_t ring_offset(int row, int half, int slot, int sub) {
  return static_cast<uint32_t>((2 * row + half) * 256 + 128 + ((slot ^ (row & 3)) * 32) + sub * 16);
}

inline size_t skinny_smem_bytes() { return kSkinnyScaleOffset + kSkinnyScaleBytes; }

template <typename T>
__device__ __forceinline__ void build_wide_table(uint8_t* smem, const float (&code)[16], float mul) {
  // Row v: lanes 0..31 hold the same pair (times mul); 8 16-byte stores per row, the rest of the row unused.
  for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
    const int v = i >> 3;
    const uint32_t pr = pack2<T>(code[v >> 4] * mul, code[v & 15] * mul);
    *reinterpret_cast<uint4*>(smem + v * 256 + (i & 7) * 16) = make_uint4(pr, pr, pr, pr);
  }
}
// Byte b of w -> its pair, for the lane whose 4 l is lane4. ZB: the table sits at shared address 0
// (the kernel checks), so the PRMT result is the address itself; otherwise one add more.
template <bool ZB>
__device__ __forceinline__ uint32_t wide_lookup(uint32_t tab, uint32_t lane4, uint32_t w, int b) {
  const uint32_t a = __byte_perm(w, lane4, 0x5504u | (static_cast<uint32_t>(b) << 4));
  uint32_t r;
  asm("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(ZB ? a : tab + a));
  return r;
}

// The kernel after its tables are staged (smem: pair table with the ring in its row holes, code8).
// MODE: kSkinnyAny (any blocksize, K % 32 == 0), kSkinnyUniform (UNIFORM, below), kSkinnyWhole (also
// K % 512 == 0 and N % 32 == 0: whole stages and tiles, so the copies, scales and activation loads
// need no bounds checks, ~10% of the loop's instructions).
// Up to 16 rows (NT <= 2) with one absmax per 64-wide group, the absmax scales each group's float32
// sums (below); at NT = 4 the folded kernel's accumulators would spill.
template <int NT, int MODE>
constexpr bool kSkinnyFold = MODE >= kSkinnyUniform && NT <= 2;

template <typename T, int NT, int MODE, bool NESTED, bool ZB>
__device__ __forceinline__ void skinny_main(const GemmParams& p, uint8_t* smem, const float* code8, const float off,
                                            const float inv_mul) {
  constexpr bool UNIFORM = MODE >= kSkinnyUniform, WHOLE = MODE == kSkinnyWhole;
  constexpr bool FOLD = kSkinnyFold<NT, MODE>;
  constexpr int S = kSkinnyStages;
  constexpr int SK = kSkinnyStageK;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kSkinnyRows;
  const int nstages = static_cast<int>((K + SK - 1) / SK);
  const uint32_t tab = mma::smem_addr(smem), lane4 = 4u * lane;
  constexpr bool nested = NESTED;

  // Copy side: thread t copies 16-byte chunks t and t + 256 of a stage (row id / 16, chunk id % 16
  // of the row's 256 bytes); rows past N and k past K as zeros. Pointers and k advance per stage.
  const uint8_t* src[2];
  uint32_t dst[2];
  int kq[2];
  bool rok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int id = tid + 256 * i, row = id >> 4, q = id & 15;
    rok[i] = n0 + row < N;
    src[i] = p.packed + (std::min<int64_t>(n0 + row, N - 1) * K) / 2 + 16 * q;
    kq[i] = 32 * q;
    dst[i] = tab + ring_offset(row, q >> 3, (q & 7) >> 1, q & 1);
  }
  int s_issue = 0;
  int64_t k_issue = 0;
  auto issue = [&]() {
    if (s_issue < nstages) {
      const uint32_t si = static_cast<uint32_t>(s_issue & (S - 1));
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool ok = WHOLE || (rok[i] && k_issue + kq[i] < K);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst[i] + si * kSkinnyRingStride),
                     "l"(ok ? src[i] : p.packed), "r"(ok ? 16 : 0)
                     : "memory");
      }
    }
    mma::cp_async_commit();
    ++s_issue;
    k_issue += SK;
#pragma unroll
    for (int i = 0; i < 2; ++i) src[i] += SK / 2;
  };

  // Compute side: warp w takes group w of every stage; the lane reads its 8 bytes of each of its 4
  // rows (n0 + 16 (r / 2) + 8 (r % 2) + g) back, and their scales from the block's table below.
  uint32_t rd[4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
    rd[r] = (ZB ? 0u : tab) + ring_offset(16 * (r >> 1) + 8 * (r & 1) + g, w >> 2, w & 3, 0) + 8 * c;
  int64_t k_lane = static_cast<int64_t>(w) * kSkinnyGroup + 16 * c;  // the lane's k in the current stage
  // Activation row 8 nt + g at k_lane (row M - 1's past M, never read: aok), always advanced, so the
  // loop carries no null test of a 64-bit pointer.
  const uint8_t* ap[NT];
  bool aok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    aok[nt] = nt * 8 + g < M;
    ap[nt] = p.A + (std::min<int64_t>(nt * 8 + g, M - 1) * K + k_lane) * 2;
  }

  // Scales: the block decodes each stage's absmax once into a shared table (double-buffered), one
  // value per (row, unit): unit = the 64-wide group (UNIFORM) or the 16-wide chunk of a lane (else);
  // 0 past K. Thread t owns entries t + 256 i; their raw values load a stage ahead. (Per-lane
  // loads of scattered rows' absmax cost as many L1 wavefronts as the whole decode.)
  constexpr int UN = UNIFORM ? kSkinnyWarps : 4 * kSkinnyWarps;  // units per row per stage
  constexpr int US = UN + 1;                                     // row stride (no bank conflicts)
  constexpr int EPT = kSkinnyRows * UN / (kSkinnyWarps * 32);    // entries per thread
  float* sct = reinterpret_cast<float*>(smem + kSkinnyScaleOffset);
  int64_t es[EPT];  // element index of the entry's first k in the current stage (not UNIFORM)
  uint32_t eu[EPT];  // the same in 32-element units (UNIFORM: ek is a multiple of 64; N * K / 32 < 2^32)
  int ek[EPT];      // its k within a stage
  int eo[EPT];      // its offset in a table buffer
#pragma unroll
  for (int i = 0; i < EPT; ++i) {
    const int e = tid + kSkinnyWarps * 32 * i, row = e / UN, unit = e % UN;
    ek[i] = unit * (UNIFORM ? kSkinnyGroup : 16);
    es[i] = std::min<int64_t>(n0 + row, N - 1) * K + ek[i];
    eu[i] = static_cast<uint32_t>(es[i] >> 5);
    eo[i] = row * US + unit;
  }
  uint32_t qv[EPT];
  float vv[EPT];
  bool okv[EPT];
  int64_t k_raw = 0;  // stage k of the raw values held
  // load_scale / finish_scale per entry, specialised: a 32-bit block index (N * K / blocksize < 2^32
  // for any weight that fits in GPU memory: 2^32 blocks of 32 are 64 GiB packed) and a power-of-two
  // nested blocksize (the dispatch sends others to the generic kernel): no 64-bit math or division.
  auto raw = [&]() {
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      qv[i] = 0u;
      vv[i] = 0.0f;
      okv[i] = WHOLE || k_raw + ek[i] < K;
      if (okv[i]) {
        const uint32_t b = UNIFORM ? eu[i] >> (p.bs_shift - 5) : static_cast<uint32_t>(es[i] >> p.bs_shift);
        if constexpr (nested) {
          qv[i] = __ldg(p.absmax.absmax_u8 + b);
          vv[i] = __ldg(p.absmax.nested_absmax + (b >> p.absmax.nested_shift));
        } else {
          vv[i] = __ldg(p.absmax.absmax_f32 + b);
        }
      }
      if constexpr (UNIFORM) eu[i] += SK / 32;
      else es[i] += SK;
    }
    k_raw += SK;
  };
  auto finish = [&](int buf) {
#pragma unroll
    for (int i = 0; i < EPT; ++i)
      sct[buf * kSkinnyRows * US + eo[i]] =
          !okv[i] ? 0.0f : (nested ? nested_absmax_value(code8[qv[i]], vv[i], off) : vv[i]) * inv_mul;
  };
  // The lane's entries: rows 16 (r / 2) + 8 (r % 2) + g, unit w (UNIFORM) or 4 w + c.
  int sco[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) sco[r] = (16 * (r >> 1) + 8 * (r & 1) + g) * US + (UNIFORM ? w : 4 * w + c);

  // The lane's activations of a step (k = k_lane .. + 15 of rows 8 nt + g), loaded at the end of the
  // step before, so that their latency hides behind the barrier and the decode; 0 past M or K
  // (the upper lanes/warps of a partial last stage).
  uint4 act[2][NT];
  auto load_act = [&](bool stage_ok) {
    const bool live = stage_ok && (WHOLE || k_lane < K);
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        act[half][nt] = (live && aok[nt]) ? __ldg(reinterpret_cast<const uint4*>(ap[nt]) + half)
                                                    : make_uint4(0u, 0u, 0u, 0u);
  };
  load_act(true);

  float acc[2][NT][4];
  zero_tiles(acc);

#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue();
  raw();
  finish(0);
  if (nstages > 1) raw();
  for (int s = 0; s < nstages; ++s) {
    mma::cp_async_wait<S - 2>();
    __syncthreads();  // stage s and its scales are in; stage s - 1's slots are free
    issue();
    const uint32_t si = static_cast<uint32_t>(s & (S - 1));
    {  // the warp's group of this stage
      float sc[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) sc[r] = sct[(s & 1) * kSkinnyRows * US + sco[r]];
      uint32_t s2[4];
      if constexpr (!FOLD) {
#pragma unroll
        for (int r = 0; r < 4; ++r) s2[r] = mma::splat2<T>(sc[r]);
      }
      uint2 wv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n"
                     : "=r"(wv[r].x), "=r"(wv[r].y)
                     : "r"(rd[r] + si * kSkinnyRingStride));
      float part[2][NT][4];  // the group's sums (FOLD)
      zero_tiles(part);
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // activations k = 16 c + 8 half .. + 7
        const uint4* bq = act[half];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {  // step j = 2 half + jj: bytes 2j, 2j + 1 = word half, bytes 2jj, 2jj + 1
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            const uint32_t wlo = half ? wv[2 * mt].y : wv[2 * mt].x;
            const uint32_t whi = half ? wv[2 * mt + 1].y : wv[2 * mt + 1].x;
            uint32_t a[4];
            a[0] = wide_lookup<ZB>(tab, lane4, wlo, 2 * jj);
            a[1] = wide_lookup<ZB>(tab, lane4, whi, 2 * jj);
            a[2] = wide_lookup<ZB>(tab, lane4, wlo, 2 * jj + 1);
            a[3] = wide_lookup<ZB>(tab, lane4, whi, 2 * jj + 1);
            if constexpr (!FOLD) {
              a[0] = mma::mul2<T>(a[0], s2[2 * mt]);
              a[1] = mma::mul2<T>(a[1], s2[2 * mt + 1]);
              a[2] = mma::mul2<T>(a[2], s2[2 * mt]);
              a[3] = mma::mul2<T>(a[3], s2[2 * mt + 1]);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              if constexpr (FOLD) mma::mma_16816<T>(part[mt][nt], a, word(bq[nt], 2 * jj), word(bq[nt], 2 * jj + 1));
              else mma::mma_16816<T>(acc[mt][nt], a, word(bq[nt], 2 * jj), word(bq[nt], 2 * jj + 1));
            }
          }
        }
      }
      if constexpr (FOLD) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            acc[mt][nt][0] = fmaf(sc[2 * mt], part[mt][nt][0], acc[mt][nt][0]);
            acc[mt][nt][1] = fmaf(sc[2 * mt], part[mt][nt][1], acc[mt][nt][1]);
            acc[mt][nt][2] = fmaf(sc[2 * mt + 1], part[mt][nt][2], acc[mt][nt][2]);
            acc[mt][nt][3] = fmaf(sc[2 * mt + 1], part[mt][nt][3], acc[mt][nt][3]);
          }
      }
    }
    if (s + 1 < nstages) {
      finish((s + 1) & 1);  // read after the next barrier; buffer (s + 1) & 1 was last read in stage s - 1
      if (s + 2 < nstages) raw();
    }
    k_lane += SK;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) ap[nt] += 2 * SK;
    load_act(s + 1 < nstages);
  }
  mma::cp_async_wait<0>();

  // Sum the 8 warps' shares in shared memory (reusing the table) and store.
  constexpr int E = 2 * NT * 4;
  float* red = reinterpret_cast<float*>(smem);
  __syncthreads();
  if (w > 0) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[(w * E + (mt * NT + nt) * 4 + e) * 32 + lane] = acc[mt][nt][e];
  }
  __syncthreads();
  if (w == 0) {
    for (int w2 = 1; w2 < kSkinnyWarps; ++w2) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] += red[(w2 * E + (mt * NT + nt) * 4 + e) * 32 + lane];
    }
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

// Three blocks per SM at one n8 tile (shared memory allows three: 66.5 KB each), two above.
template <typename T, int NT, int MODE>
__global__ void __launch_bounds__(kSkinnyWarps * 32, NT == 1 ? 3 : 2) gemm4_skinny_kernel(const GemmParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  float* code8 = reinterpret_cast<float*>(smem + kWideTableBytes);
  const float mul = kSkinnyFold<NT, MODE> ? p.code_mul : 1.0f;
  build_wide_table<T>(smem, p.code, mul);
  const float off = stage_nested(p.absmax, code8);
  __syncthreads();
  const bool nested = p.absmax.absmax_f32 == nullptr;
  if (mma::smem_addr(smem) == 0) {
    if (nested) skinny_main<T, NT, MODE, true, true>(p, smem, code8, off, 1.0f / mul);
    else skinny_main<T, NT, MODE, false, true>(p, smem, code8, off, 1.0f / mul);
  } else {
    if (nested) skinny_main<T, NT, MODE, true, false>(p, smem, code8, off, 1.0f / mul);
    else skinny_main<T, NT, MODE, false, false>(p, smem, code8, off, 1.0f / mul);
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
  zero_tiles(acc);

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
// Warpgroup kernel (sm_90a; the wgmma pipeline is described in gemm_4bit_wgmma.cuh)
// =============================================================================================
// Shared memory: the activation ring (S x BN rows of 128 bytes, 1024-byte aligned for the swizzle),
// the packed-W ring (S x 128 rows of 32 bytes), the pair table (32 KB), code8.
// Stages: 6 at batch tile 64 (two blocks per SM fit), 5 at 256 (the most that fit), 8 at 128 with
// one block per tile (ncu source counters at batch 128, eighth session: 13% of the warps' samples
// waited for a tile's copies with 5; 8 stages took 8192x28672 at batch 128 from 0.1653 to 0.1542 ms,
// median of 7 interleaved rounds, benchmarks/results/h200/experiments/ab_paths_run3.log), and 8 for
// stream-K at 128 with the packed scales (SCALES 2; H100, ninth session, 5 interleaved rounds:
// 14336x4096 at batch 96 / 128 0.0502 / 0.0508 -> 0.0492 / 0.0499 ms, h100/ab_paths_sk8.log);
// stream-K with the other scale modes keeps 5.
constexpr int wg_stages(int bn, bool sk, int scales = 2) {
  return bn == 64 ? 6 : bn == 128 && (!sk || scales == 2) ? 8 : 5;
}
template <int BN, int STAGES = wg_stages(BN, false)>
struct WgCfg {
  static constexpr int kRows = 128, kBK = 64, kThreads = 256;
  static constexpr int kStages = STAGES;
  static constexpr int kAStage = BN * 128;
  static constexpr int kWStage = kRows * 32;
  static constexpr int kWOff = kStages * kAStage;
  static constexpr int kTabOff = kWOff + kStages * kWStage;
  static constexpr int kCode8Off = kTabOff + mma::kPairTableBytes;
  static constexpr int kBarOff = kCode8Off + 1024;
  static constexpr int kSmem = kBarOff + 16 * kStages + 1024;  // + room to align the base to 1024
  static constexpr int kGroupM = 4;                      // raster: 4 batch tiles share a W tile's pass
  static constexpr int kLookahead = 4;                   // tiles between a scale's load and its use
};

// Stream-K (SK): where whole tiles leave SMs idle (14336x4096 at batch 64: 32 tiles of 128 rows on
// 132 SMs; the dispatch uses it only there, see wg_stream_k_pays) a resident grid of G <= #SM blocks
// takes even shares of all (tile, k tile) iterations, in units of 4 k tiles (KT % 4 == 0), and runs
// one pipeline (copies, scales, decode, wgmma) through its whole share. A share is a run of segments:
// a tile's tail (the first, if the share starts inside a tile), whole tiles, a tile's head (the
// last). A whole tile is stored as always; a block whose share starts inside a tile stores that
// segment's float32 sums in its slot of `partial` and raises its flag; the block holding the tile's
// head (k tile 0) ends its share there, waits for the flags of the blocks after it that hold the
// rest of the tile, adds their sums in block order (so the result is deterministic) and stores.
// Those blocks reach their flag at the start of their shares, and the grid is resident, so the wait
// is short and cannot deadlock. Without SK a block's share is one whole tile (blockIdx.x's).
// DP + SK (where the tiles are many but not a whole number of waves, wg_dp_stream_k_pays): each
// block first takes dp whole tiles (b, b + G, ...), all blocks on the same k tile at a time as with
// one block per tile, and only the tiles past dp * G are split.
struct WgSplit {
  float* partial = nullptr;  // [G][BN / 2][256] float32 (SK)
  int* flags = nullptr;      // [G], zero at launch (SK)
  int64_t units = 0;         // (tiles - dp * G) * KT / 4 (SK)
  int dp = 0;                // whole tiles per block before its stream-K share (SK)
};
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Thread (warp w, lane 4 g + c) of the block: W rows 64 (w / 4) + 16 (w % 4) + g + 8 h (h = 0, 1),
// which are its rows of the m64 A fragments; lane c takes byte c of each packed word (k 2c, 2c + 1
// of a k8 half), i.e. a0/a1 from word 2 kk and a2/a3 from word 2 kk + 1 of k16 step kk.
// SCALES (launch_wg): 0 one absmax per 32-wide half; 1 (UNIFORM: blocksize >= 64, K % 64 == 0) one
// per row and tile; 2 (PACK: also blocksize 64 and KT % 4 == 0) the same, loaded once per 4 tiles.
// PW: a ninth warp is the producer (the copies of every slot, the whole ring ahead); without it
// thread 0 of warp 0 produces between its own steps, S - 2 slots ahead.
template <typename T, int BN, int SCALES, bool NESTED, bool SK, bool PW = false, int STAGES = wg_stages(BN, SK, SCALES)>
__global__ void __launch_bounds__(PW ? 288 : 256, 1)
    gemm4_wg_kernel(const GemmParams p, const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                    const int m_tiles, const int n_tiles, const WgSplit split) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WgCfg<BN, STAGES>;
  constexpr int S = C::kStages;
  constexpr bool UNIFORM = SCALES >= 1, PACK = SCALES == 2;
  constexpr int NS = UNIFORM ? 2 : 4;  // scales per lane and tile
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (mma::smem_addr(smem_raw) & 1023u)) & 1023u);
  uint32_t* tab = reinterpret_cast<uint32_t*>(smem + C::kTabOff);
  float* code8 = reinterpret_cast<float*>(smem + C::kCode8Off);
  // full[s] (bar0 + 8 s): the tile in slot s landed (one arrival, the producer's, plus the copies'
  // bytes); empty[s] (bar0 + 8 (S + s)): all 8 warps are done with it (their wgmma group included).
  const uint32_t bar0 = mma::smem_addr(smem + C::kBarOff);
  auto full_bar = [&](int s) { return bar0 + 8u * s; };
  auto empty_bar = [&](int s) { return bar0 + 8u * (S + s); };
  mma::build_pair_table<T>(tab, p.code);
  const float off = stage_nested(p.absmax, code8);
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      wg::mbar_init(full_bar(s), 1);
      wg::mbar_init(empty_bar(s), C::kThreads / 32);
    }
    wg::mbar_init_fence();
  }
  __syncthreads();

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int64_t N = p.N, K = p.K;
  const int KT = static_cast<int>((K + C::kBK - 1) / C::kBK);
  const uint32_t a_base = mma::smem_addr(smem), w_base = a_base + C::kWOff;
  // Tile t -> its batch rows m0 and W rows n0: groups of kGroupM batch tiles walk the W tiles
  // together, so a W tile is read from DRAM once per group. Walk: the same order one tile at a
  // time, with no division (the loop's cursors cross tiles with it).
  struct Walk {
    int first_m, gm, mi, ni;
  };
  auto walk_at = [&](int t) {
    const int group = t / (C::kGroupM * n_tiles), first_m = group * C::kGroupM;
    const int gm = min(C::kGroupM, m_tiles - first_m), local = t - group * C::kGroupM * n_tiles;
    return Walk{first_m, gm, local % gm, local / gm};
  };
  auto walk_next = [&](Walk& w) {
    if (++w.mi == w.gm) {
      w.mi = 0;
      if (++w.ni == n_tiles) {
        w.ni = 0;
        w.first_m += C::kGroupM;
        w.gm = min(C::kGroupM, m_tiles - w.first_m);
      }
    }
  };
  auto m0_of = [&](const Walk& w) { return (w.first_m + w.mi) * BN; };
  auto n0_of = [&](const Walk& w) { return w.ni * C::kRows; };
  // This block's work: SK: split.dp whole tiles (blockIdx.x + i G), then its share [sk_begin,
  // sk_begin + sk_len) of the iterations (tile - dp G) * KT + k tile of the tiles past dp G;
  // otherwise tile blockIdx.x. len iterations in all.
  const int G = gridDim.x, tail0 = split.dp * G;
  int len, tile0, kt0, sk_tile = 0, sk_kt = 0;
  bool end_tail = true;  // the last segment runs to its tile's end
  if constexpr (SK) {
    const int64_t sk_begin = 4 * (split.units * blockIdx.x / G);
    const int sk_len = static_cast<int>(4 * (split.units * (blockIdx.x + 1) / G) - sk_begin);
    sk_tile = tail0 + static_cast<int>(sk_begin / KT);
    sk_kt = static_cast<int>(sk_begin % KT);
    len = split.dp * KT + sk_len;
    tile0 = split.dp > 0 ? static_cast<int>(blockIdx.x) : sk_tile;
    kt0 = split.dp > 0 ? 0 : sk_kt;
    if (sk_len > 0) end_tail = (sk_begin + sk_len) % KT == 0;
  } else {
    len = KT;
    tile0 = blockIdx.x;
    kt0 = 0;
  }

  // A cursor's tile (SK): whole tiles blockIdx.x + i G while dp_left > 0, then the stream-K tiles
  // in order; next_tile returns the k tile the next one starts at (sk_kt where the share starts).
  struct Cur {
    Walk w;
    int t, dp_left;
  };
  auto cur_at = [&]() { return Cur{walk_at(tile0), tile0, split.dp}; };
  auto next_tile = [&](Cur& cu) {
    if (cu.dp_left > 1) {
      --cu.dp_left;
      cu.t += G;
      cu.w = walk_at(cu.t);
      return 0;
    }
    if (cu.dp_left == 1) {
      cu.dp_left = 0;
      cu.t = sk_tile;
      cu.w = walk_at(cu.t);
      return sk_kt;
    }
    ++cu.t;
    walk_next(cu.w);
    return 0;
  };

  // Copies (thread 0, the producer): the activation tile and the packed-W tile by TMA into slot
  // j % S, both completing on full[slot]; rows past M or N and k past K arrive as zeros, the
  // activations with the 128-byte swizzle the descriptor expects. A slot is refilled once all warps
  // released its previous tile (empty[slot]); no block-wide barrier in the loop.
  uint32_t empty_phases = 0;  // producer: bit s = parity of empty[s]'s next completion
  Cur pc = cur_at();
  int p_kt = kt0;
  auto produce = [&](int j, int slot) {
    if (j < len) {
      if (j >= S) {
        wg::mbar_wait(empty_bar(slot), (empty_phases >> slot) & 1u);
        empty_phases ^= 1u << slot;
      }
      wg::mbar_expect_tx(full_bar(slot), C::kAStage + C::kWStage);
      wg::tma_load_2d(a_base + slot * C::kAStage, &a_map, p_kt * C::kBK, m0_of(pc.w), full_bar(slot));
      wg::tma_load_2d(w_base + slot * C::kWStage, &w_map, p_kt * (C::kBK / 2), n0_of(pc.w), full_bar(slot));
      if (++p_kt == KT && SK) p_kt = next_tile(pc);
    }
  };

  // Scales of this lane's rows, raw values loaded kLookahead tiles ahead (in as many register sets:
  // a tile's step is short next to a DRAM round trip). Indices in 32-wide units of the flattened
  // weight (K % 32 == 0, blocksize >= 32; the host keeps N * K / 32 below 2^32): unit u of a row
  // starting at unit base lies in block (base + u) >> (log2(blocksize) - 5).
  const int wrow = 64 * (warp >> 2) + 16 * (warp & 3) + g;  // row h = 0 within the block's 128
  uint32_t ubase[2];
  Cur rc = cur_at();
  auto set_ubase = [&]() {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ubase[h] = static_cast<uint32_t>((std::min<int64_t>(n0_of(rc.w) + wrow + 8 * h, N - 1) * K) >> 5);
      asm volatile("" : "+r"(ubase[h]));  // kept in a register, not recomputed from 64-bit math every step
    }
  };
  set_ubase();
  const int ushift = p.bs_shift - 5, KU = static_cast<int>(K >> 5);
  constexpr int LA = C::kLookahead;
  uint32_t qv[LA][NS];
  float vv[LA][NS];
  // Iteration j (k tile kt of the tile whose rows ubase holds); zeros past the share.
  auto raw = [&](int j, int kt, uint32_t (&q)[NS], float (&v)[NS]) {
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const int h = UNIFORM ? i : (i >> 1), u = 2 * kt + (UNIFORM ? 0 : (i & 1));
      q[i] = 0u;
      v[i] = 0.0f;
      if (j < len && u < KU) {
        const uint32_t b = (ubase[h] + static_cast<uint32_t>(u)) >> ushift;
        if constexpr (NESTED) {
          q[i] = __ldg(p.absmax.absmax_u8 + b);
          v[i] = __ldg(p.absmax.nested_absmax + (b >> p.absmax.nested_shift));
        } else {
          v[i] = __ldg(p.absmax.absmax_f32 + b);
        }
      }
    }
  };
  uint32_t s2[NS];
  auto finish = [&](const uint32_t (&q)[NS], const float (&v)[NS]) {
#pragma unroll
    for (int j = 0; j < NS; ++j) s2[j] = mma::splat2<T>(NESTED ? nested_absmax_value(code8[q[j]], v[j], off) : v[j]);
  };
  // PACK (blocksize 64, KT % 4 == 0; groups of 4 k tiles never straddle a share or a tile): the
  // absmax of k tiles kt .. kt + 3 (kt % 4 == 0) of a row are the 4 bytes at row * KT + kt, one
  // aligned 32-bit load, and they share one nested absmax (256 % 4 == 0); plain absmax: one 16-byte
  // load. A group's values are loaded at the first step of the group before it.
  uint32_t gq[2][2];  // [next, current][h]: 4 absmax codes
  float4 gv[2][2];    // nested: .x only; plain: the 4 absmax
  auto raw_group = [&](int j, int kt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      gq[0][h] = 0u;
      gv[0][h] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (j < len) {
        const uint32_t b = (ubase[h] >> 1) + static_cast<uint32_t>(kt);  // row * KT + kt
        if constexpr (NESTED) {
          gq[0][h] = __ldg(reinterpret_cast<const uint32_t*>(p.absmax.absmax_u8 + b));
          gv[0][h].x = __ldg(p.absmax.nested_absmax + (b >> p.absmax.nested_shift));
        } else {
          gv[0][h] = __ldg(reinterpret_cast<const float4*>(p.absmax.absmax_f32 + b));
        }
      }
    }
  };
  auto finish_group = [&](int i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float v = NESTED ? nested_absmax_value(code8[(gq[1][h] >> (8 * i)) & 0xFFu], gv[1][h].x, off)
                             : (i == 0 ? gv[1][h].x : i == 1 ? gv[1][h].y : i == 2 ? gv[1][h].z : gv[1][h].w);
      s2[h] = mma::splat2<T>(v);
    }
  };

  // Decode: lane c takes byte c of each packed word from the pair table (lookup_sel).
  const uint32_t tab_base = mma::smem_addr(tab), lane8 = 8u * lane, sel = 0x5504u | (static_cast<uint32_t>(c) << 4);
  auto look = [&](uint32_t w) { return lookup_sel(tab_base, lane8, sel, w); };
  const uint32_t w_rd = w_base + wrow * 32;
  auto decode = [&](int slot, uint32_t (&a)[4][4]) {
    uint4 w[2][2];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int q = 0; q < 2; ++q)
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(w[h][q].x), "=r"(w[h][q].y), "=r"(w[h][q].z), "=r"(w[h][q].w)
                     : "r"(w_rd + slot * C::kWStage + 256 * h + 16 * q));
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t sa = s2[UNIFORM ? 0 : (kk >> 1)], sb = s2[UNIFORM ? 1 : 2 + (kk >> 1)];
      a[kk][0] = mma::mul2<T>(look(word(w[0][kk >> 1], 2 * (kk & 1))), sa);
      a[kk][1] = mma::mul2<T>(look(word(w[1][kk >> 1], 2 * (kk & 1))), sb);
      a[kk][2] = mma::mul2<T>(look(word(w[0][kk >> 1], 2 * (kk & 1) + 1)), sa);
      a[kk][3] = mma::mul2<T>(look(word(w[1][kk >> 1], 2 * (kk & 1) + 1)), sb);
    }
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
  auto compute = [&](int slot, const uint32_t (&a)[4][4]) {
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wg::mma_rs<T, BN>(acc, a[kk], wg::desc_k_sw128(a_base + slot * C::kAStage + 32 * kk));
    wg::commit();
  };

  // The 8 consumer warps only (with PW the producer warp has left the loop).
  auto consumers_sync = [&]() {
    if constexpr (PW) asm volatile("bar.sync 1, 256;\n" ::: "memory");
    else __syncthreads();
  };
  // The end of a segment of tile t: head = it began at k tile 0, tail = it ran to KT.
  // acc[4 j + e]: W row wrow + 8 (e / 2), batch row 8 j + 2 c + e % 2.
  auto segment_end = [&](int t, bool head, bool tail) {
    wg::wait<0>();
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) asm volatile("" : "+f"(acc[i])::"memory");
    if (SK && !head) {  // the rest of a tile whose head another block holds: leave the sums to it
      float* dst = split.partial + static_cast<int64_t>(blockIdx.x) * (BN / 2) * C::kThreads + tid;
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) __stcg(dst + i * C::kThreads, acc[i]);
      consumers_sync();
      if (tid == 0) {
        __threadfence();
        atomicExch(split.flags + blockIdx.x, 1);
      }
    } else {
      if (SK && !tail) {  // the head: add the sums of the blocks holding the rest, in block order
        const int64_t last_unit = (static_cast<int64_t>(t - tail0 + 1) * KT) / 4 - 1;
        const int last = static_cast<int>(((last_unit + 1) * G + split.units - 1) / split.units - 1);
        for (int b = blockIdx.x + 1; b <= last; ++b) {
          if (tid == 0) {
            while (ld_acquire(split.flags + b) == 0) __nanosleep(100);
          }
          consumers_sync();
          const float* src = split.partial + static_cast<int64_t>(b) * (BN / 2) * C::kThreads + tid;
#pragma unroll
          for (int i = 0; i < BN / 2; ++i) acc[i] += __ldcg(src + i * C::kThreads);
        }
      }
      const Walk w = walk_at(t);
      const int m0 = m0_of(w), n0 = n0_of(w);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          store_out<T>(p, m0 + 8 * j + 2 * c + (e & 1), n0 + wrow + 8 * (e >> 1), acc[4 * j + e]);
    }
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
  };

  if constexpr (PW) {
    if (warp == 8) {  // the producer warp: every iteration into slot j % S, once its last use is released
      if (lane == 0) {
        for (int jj = 0, slot = 0; jj < len; ++jj, slot = slot + 1 == S ? 0 : slot + 1) produce(jj, slot);
      }
      return;
    }
  }
  uint32_t af0[4][4], af1[4][4];
  int rd_slot = 0, wr_slot = S - 2, prev_slot = 0;
  uint32_t phases = 0;  // bit s: parity of full[s]'s next completion
  if (!PW && tid == 0) {
    for (int s = 0; s < S - 2; ++s) produce(s, s);
  }
  if constexpr (PACK) {
    raw_group(0, kt0);
  } else {
#pragma unroll
    for (int i = 0; i < LA; ++i) raw(i, kt0 + i, qv[i], vv[i]);
  }
  // r_kt: the k tile of iteration j + LA, the first whose scales the group of 4 from j loads (SK:
  // groups never straddle tiles, so the cursor moves to the next tile only between groups).
  int r_kt = kt0 + LA;
  // Step i (0..3) of a group of 4: iteration j, whose scale set is i; kt_raw: the k tile of
  // iteration j + LA (PACK: the group after this one starts there).
  auto step = [&](int j, int kt_raw, uint32_t (&af)[4][4], int i) {
    if (!PW && tid == 0) produce(j + S - 2, wr_slot);  // into iteration j - 2's slot, once released
    if constexpr (PACK) {
      if (i == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          gq[1][h] = gq[0][h];
          gv[1][h] = gv[0][h];
        }
        raw_group(j + LA, kt_raw);
      }
      finish_group(i);
    } else {
      finish(qv[i], vv[i]);
      raw(j + LA, kt_raw, qv[i], vv[i]);
    }
    wg::mbar_wait(full_bar(rd_slot), (phases >> rd_slot) & 1u);  // iteration j landed
    phases ^= 1u << rd_slot;
    decode(rd_slot, af);
    compute(rd_slot, af);
    wg::wait<1>();  // group j - 1 done: its A registers are free and the warp is done with its slot
    if (j > 0 && lane == 0) wg::mbar_arrive(empty_bar(prev_slot));
    prev_slot = rd_slot;
    rd_slot = rd_slot + 1 == S ? 0 : rd_slot + 1;
    wr_slot = wr_slot + 1 == S ? 0 : wr_slot + 1;
  };
  static_assert(LA == 4, "the loop below is unrolled for 4 scale sets");
  // SK: shares and tiles start at multiples of 4 k tiles, so segments end only between groups of 4.
  int j = 0, c_kt = kt0;
  Cur cc = cur_at();
  bool seg_head = kt0 == 0;
  for (; j + 3 < len; j += 4) {
    if (SK && r_kt == KT) {
      r_kt = next_tile(rc);
      set_ubase();
    }
    step(j, r_kt, af0, 0);
    step(j + 1, r_kt + 1, af1, 1);
    step(j + 2, r_kt + 2, af0, 2);
    step(j + 3, r_kt + 3, af1, 3);
    r_kt += 4;
    if constexpr (SK) {
      c_kt += 4;
      if (c_kt == KT && j + 4 < len) {
        segment_end(cc.t, seg_head, true);
        c_kt = next_tile(cc);
        seg_head = c_kt == 0;
      }
    }
  }
  if (j < len) step(j, r_kt, af0, 0);
  if (j + 1 < len) step(j + 1, r_kt + 1, af1, 1);
  if (j + 2 < len) step(j + 2, r_kt + 2, af0, 2);
  segment_end(cc.t, seg_head, end_tail);
#else
  __trap();  // built without sm_90a code: the host launches it only on sm_90 (wg_ok)
#endif
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
// Host side
// =============================================================================================
enum class Path { Auto, Skinny, TensorCore, Warpgroup, Dequant, Generic };

// Development aid (benchmarks/tests force each path): NF4KIT_GEMM_PATH=skinny|tc|wg|wgsk|wgdp|dequant|
// generic (wg: the warpgroup kernel one block per tile, wgsk: stream-K, wgdp: DP + SK, wherever they
// can run; see launch_wg). split: the warpgroup kernel's split_mode it names (-1: not named).
struct PathChoice {
  Path path = Path::Auto;
  int split = -1;
};
PathChoice path_override() {
  const char* s = std::getenv("NF4KIT_GEMM_PATH");
  if (s == nullptr || *s == '\0') return {};
  if (!std::strcmp(s, "skinny")) return {Path::Skinny};
  if (!std::strcmp(s, "tc")) return {Path::TensorCore};
  if (!std::strcmp(s, "wg")) return {Path::Warpgroup, 0};
  if (!std::strcmp(s, "wgsk")) return {Path::Warpgroup, 1};
  if (!std::strcmp(s, "wgdp")) return {Path::Warpgroup, 2};
  if (!std::strcmp(s, "dequant")) return {Path::Dequant};
  if (!std::strcmp(s, "generic")) return {Path::Generic};
  return {};
}

// Dispatch, from medians measured on an H200 (torch 2.11, fp16 and bf16, all four benchmark layers;
// benchmarks/results/h200/matmul.md and the wg_probe_*.log next to it, fifth session):
//   M <= 32      skinny: 8192x28672 at M=1/8/16/32: 0.054/0.060/0.077/0.103 ms vs cuBLAS fp16
//                ~0.127 ms (2.3x/2.1x/1.7x/1.2x); the warpgroup kernel takes ~0.10 ms at 16 and 32.
//                Since the ninth session 25..32 on long K go to the warpgroup kernel (kWgFromM).
//   33..512      warpgroup kernel (sm_90), when it has at least half a block per SM: 8192x28672 at
//                M=64/128/256/512: 0.103/0.155/0.219/0.436 ms vs 0.280/0.291/0.348/0.502 ms for
//                dequantize + cuBLAS (the mma.sync tensor-core kernel: 0.214 ms at 64, 0.41 at 128).
//                With fewer blocks (N = 4096: 32 row tiles) stream-K where it measured faster
//                (wg_stream_k_pays, seventh session), else dequantize + cuBLAS; with one to four
//                waves of tiles at batch tile 256 and K >= 8192, DP + SK (wg_dp_stream_k_pays, eighth).
//   513..1024    the warpgroup kernel when K >= 8192 (8192x28672 at 1024: 0.763 vs 0.849 ms; 14336x4096:
//                0.190 vs 0.204), else dequantize + cuBLAS (4096x14336 at 1024: 0.205 vs 0.220 ms).
//   larger       dequantize + cuBLAS (8192x28672 at 4096: 3.01 vs 3.42 ms for the warpgroup kernel).
//   33..64 without sm_90: the mma.sync tensor-core kernel as before.
constexpr int64_t kSkinnyAutoMaxM = 32;
// From 25 rows on, with K >= 8192 and many row tiles, the warpgroup kernel (batch tile 64): H100,
// ninth session, 8192x28672, 5 interleaved rounds, skinny vs warpgroup: batch 16 0.0837 vs 0.1028 ms,
// 24 0.0970 vs 0.0994, 32 0.1030 vs 0.0953 (4096x14336 at 32, skinny, 0.0375 ms, and at 64, warpgroup,
// 0.0376: no gain to take there).
constexpr int64_t kWgFromM = 25;
constexpr int64_t kWgMaxM = 512, kWgMaxLongKM = 1024, kWgLongK = 8192;
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
  p.code_mul = a.qt == QuantType::FP4 ? 6.0f : 1.0f;
  return p;
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

template <typename T, int NT, int MODE>
void launch_skinny_slice(const GemmParams& p, cudaStream_t stream) {
  auto* kernel = &gemm4_skinny_kernel<T, NT, MODE>;
  allow_smem(kernel, static_cast<int>(skinny_smem_bytes()));
  const int64_t blocks = ceil_div(p.N, kSkinnyRows);
  kernel<<<static_cast<unsigned>(blocks), kSkinnyWarps * 32, skinny_smem_bytes(), stream>>>(p);
  NF4KIT_LAUNCH_CHECK();
}

// The batch in slices of at most 32 rows, each one pass over W.
template <typename T>
void launch_skinny(const GemmParams& p, int64_t blocksize, cudaStream_t stream) {
  // One absmax per (row, 64-wide group): the lanes share it, and up to 16 rows it multiplies the
  // group's float32 sums instead of each pair of codes.
  // (and 32-element scale indices fit in 32 bits)
  const bool uniform = blocksize >= kSkinnyGroup && p.K % kSkinnyGroup == 0 && p.N * p.K < (int64_t{1} << 37);
  const char* force = std::getenv("NF4KIT_SKINNY_MODE");  // development aid: "uniform" skips kSkinnyWhole
  const bool whole = uniform && p.K % kSkinnyStageK == 0 && p.N % kSkinnyRows == 0 &&
                     !(force != nullptr && !std::strcmp(force, "uniform"));
  for (int64_t m0 = 0; m0 < p.M; m0 += kSkinnyMaxM) {
    GemmParams q = p;
    q.M = std::min<int64_t>(kSkinnyMaxM, p.M - m0);
    q.A = p.A + m0 * p.K * static_cast<int64_t>(sizeof(T));
    q.out = static_cast<uint8_t*>(p.out) + m0 * p.N * static_cast<int64_t>(sizeof(T));
    auto go = [&](auto mode_tag) {
      constexpr int MODE = decltype(mode_tag)::value;
      if (q.M <= 8) launch_skinny_slice<T, 1, MODE>(q, stream);
      else if (q.M <= 16) launch_skinny_slice<T, 2, MODE>(q, stream);
      else launch_skinny_slice<T, 4, MODE>(q, stream);
    };
    if (whole) go(std::integral_constant<int, kSkinnyWhole>{});
    else if (uniform) go(std::integral_constant<int, kSkinnyUniform>{});
    else go(std::integral_constant<int, kSkinnyAny>{});
  }
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

// 2-D TMA descriptors (cuTensorMapEncodeTiled, from the driver through the runtime: no -lcuda):
// activations A [M, K] of T in boxes of box_rows x 64 k with the 128-byte swizzle; packed W [N, K / 2]
// bytes in boxes of 128 rows x 32 bytes. Zeros out of bounds.
CUtensorMap tensor_map_2d(const void* base, CUtensorMapDataType type, uint64_t inner, uint64_t rows, uint64_t row_bytes,
                          uint32_t box_inner, uint32_t box_rows, CUtensorMapSwizzle swizzle) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
    TORCH_CHECK(fn != nullptr && q == cudaDriverEntryPointSuccess, "gemm_4bit: cuTensorMapEncodeTiled not found");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {inner, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_inner, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(&map, type, 2, const_cast<void*>(base), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "gemm_4bit: cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
  return map;
}

int64_t wg_tile_n(int64_t M) { return M <= 64 ? 64 : M <= 128 ? 128 : 256; }  // the batch tile by batch
int64_t wg_tiles(int64_t M, int64_t N) { return ceil_div(N, 128) * ceil_div(M, wg_tile_n(M)); }
// Stream-K where it measured faster (H200, benchmarks/results/h200/wgsk_probe.log and the seventh
// session's bench runs): only where whole tiles would keep fewer than half the SMs busy (shapes that
// went to dequantize + cuBLAS before: N = 4096, 32-64 tiles), with shares of at least 16 k tiles
// (BN 64, 128) or 48 (BN 256): 14336x4096 at batch 64/128/256/512 0.044/0.052/0.070/0.116 ms vs
// 0.085/0.086/0.095/0.128 for dequantize + cuBLAS, the same in three runs. 4096x4096 (shares of
// 15.5 k tiles at batch 64 and 128) measured 0.024, 0.030 and 0.036 ms at batch 64 in three runs
// (dequantize + cuBLAS 0.026-0.036): too unsteady to choose, so it keeps dequantize + cuBLAS. With
// more tiles stream-K was no faster (8192x28672 at batch 128: 0.155 vs 0.157 ms) or slower (at 64:
// 0.126 vs 0.106 ms; 4096x14336, 112 tiles, at 64-512), a loss per k tile not understood yet.
// tiles of batch tile bn, KT 64-wide k tiles.
bool wg_stream_k_pays(int64_t tiles, int64_t KT, int64_t bn, int64_t sms) {
  return KT % 4 == 0 && tiles * 2 < sms && tiles * KT >= sms * (bn == 256 ? 48 : 16);
}
// DP + SK (whole tiles for the full waves, stream-K over the last partial one) where it measured
// faster (H200, eighth session, benchmarks/results/h200/experiments/): batch tile 256, long rows (KT
// >= 128), between one and four waves of tiles, not a whole number of them. 8192x28672 (224 / 448
// tiles at batch 256 / 512), wg vs wgdp, ms: run 1 (one after the other) 0.2386 vs 0.2215 and 0.4543
// vs 0.4199; run 3 (median of 7 interleaved rounds) 0.2375 vs 0.2211 and 0.5113 vs 0.4295. Not at
// batch 1024 (896 tiles: run 1 0.8852 vs 0.8592, but run 2 0.72 vs 0.80-0.83 and run 3 0.8731 vs
// 0.9100; H100, ninth session, 5 interleaved rounds: 0.7664 vs 0.7941), nor with KT = 64 (4096x14336
// at 512: 0.1151 vs 0.1177: each split tile's fix-up weighs twice as much next to its work). Batch
// tile 128 too since the ninth session: 8192x28672 at 128 (224 tiles) gained a little in every
// measurement, 0.1576 -> 0.1561 ms (H200, eighth session), 0.1424 -> 0.1401 (H100, thread 0
// producing) and 0.1302 -> 0.1255 with the producer warp (h100/ab_paths_producer_warp.log).
bool wg_dp_stream_k_pays(int64_t tiles, int64_t KT, int64_t bn, int64_t sms) {
  return KT % 4 == 0 && bn >= 128 && KT >= 128 && tiles > sms && tiles < 4 * sms && tiles % sms != 0;
}

// One block per tile, stream-K (wg_stream_k_pays) or DP + SK (wg_dp_stream_k_pays); split_mode:
// -1 chooses, 0 one block per tile, 1 stream-K, 2 DP + SK (the dev switch NF4KIT_GEMM_PATH = wg, wgsk,
// wgdp forces them on any shape they can take: K % 256 == 0 for the split ones; tiny shares, many
// blocks per tile, as the tests want).
template <typename T, int BN>
void launch_wg(const GemmParams& p, bool uniform, int split_mode, cudaStream_t stream) {
  // Scale mode: per 32-wide half (0), per row and tile (1), or per row and group of 4 tiles by one
  // load (2: blocksize 64, KT % 4 == 0, the absmax arrays aligned for those loads; ~25 fewer
  // instructions a step; H100, eighth session, 5 interleaved rounds: 8192x28672 at batch 64 / 128 /
  // 256 0.1062 / 0.1523 / 0.2186 -> 0.0959 / 0.1409 / 0.2077 ms, 4096x14336 at 64 / 128 0.0408 /
  // 0.0440 -> 0.0383 / 0.0407, benchmarks/results/h100/packed_scales.log). Development aid:
  // NF4KIT_WG_SCALES=step keeps mode 1 at blocksize 64 (the tests compare the two bit for bit).
  using C = WgCfg<BN>;
  const int64_t m_tiles = ceil_div(p.M, BN), n_tiles = ceil_div(p.N, C::kRows);
  const int64_t tiles = m_tiles * n_tiles, KT = ceil_div(p.K, C::kBK), sms = sm_count();
  const bool nested = p.absmax.absmax_f32 == nullptr;
  int mode = 0;  // as split_mode, chosen
  if (KT % 4 == 0)
    mode = split_mode >= 0                              ? split_mode
           : wg_stream_k_pays(tiles, KT, BN, sms)    ? 1
           : wg_dp_stream_k_pays(tiles, KT, BN, sms) ? 2
                                                     : 0;
  const bool sk = mode > 0;
  WgSplit split;
  at::Tensor partial, flags;
  int64_t grid = tiles;
  if (sk) {
    split.units = tiles * KT / 4;
    const char* g_env = std::getenv("NF4KIT_WG_GRID");  // development aid: fewer blocks, to test DP + SK small
    const int64_t g_max = g_env != nullptr && *g_env ? std::max(1, std::atoi(g_env)) : sms;
    grid = std::min<int64_t>(g_max, split.units);
    if (mode == 2) {  // DP + SK: whole tiles for all full waves, stream-K for the rest
      int64_t dp = tiles / grid;
      // every block needs a non-empty share of the rest (or none at all: the rest is empty)
      while (dp > 0 && tiles > dp * grid && (tiles - dp * grid) * KT / 4 < grid) --dp;
      split.dp = static_cast<int>(dp);
      split.units = (tiles - dp * grid) * KT / 4;
    }
    const auto opts = at::TensorOptions().device(at::kCUDA, at::cuda::current_device());
    partial = at::empty({grid * (BN / 2) * C::kThreads}, opts.dtype(at::kFloat));
    flags = at::zeros({grid}, opts.dtype(at::kInt));
    split.partial = partial.data_ptr<float>();
    split.flags = flags.data_ptr<int>();
  }
  const CUtensorMap a_map = tensor_map_2d(
      p.A, std::is_same_v<T, at::Half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, p.K, p.M,
      p.K * 2, 64, BN, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap w_map = tensor_map_2d(p.packed, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.K / 2, p.N, p.K / 2, C::kBK / 2,
                                          C::kRows, CU_TENSOR_MAP_SWIZZLE_NONE);
  auto go = [&](auto kernel, auto sk_tag, auto scales_tag, int threads = C::kThreads) {
    constexpr int smem = WgCfg<BN, wg_stages(BN, decltype(sk_tag)::value, decltype(scales_tag)::value)>::kSmem;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(
        p, a_map, w_map, static_cast<int>(m_tiles), static_cast<int>(n_tiles), split);
    NF4KIT_LAUNCH_CHECK();
  };
  const char* sc_env = std::getenv("NF4KIT_WG_SCALES");
  const bool pack = uniform && p.bs_shift == 6 && KT % 4 == 0 &&
                    (nested ? reinterpret_cast<uintptr_t>(p.absmax.absmax_u8) % 4 == 0
                            : reinterpret_cast<uintptr_t>(p.absmax.absmax_f32) % 16 == 0) &&
                    !(sc_env != nullptr && !std::strcmp(sc_env, "step"));
  // A ninth warp as the producer at batch tile 128 with the packed scales (PW; H100, ninth session, 5
  // interleaved rounds, thread 0 producing -> producer warp: 8192x28672 at batch 128 0.1424 -> 0.1302
  // ms, with DP + SK 0.1401 -> 0.1255; 4096x14336 at 96 / 128 0.0424 / 0.0427 -> 0.0386 / 0.0388;
  // 14336x4096 (stream-K) at 128 0.0503 -> 0.0465; benchmarks/results/h100/ab_paths_producer_warp.log).
  // Not at batch tile 64 (two blocks per SM: 288 threads would not keep 128 registers) nor 256: at
  // 288 threads ptxas allots 168 registers a thread (157-166 used at 128), and batch tile 256 needs
  // up to 254 (compiled: 168 with up to 112 bytes of stack). Development aid: NF4KIT_WG_PRODUCER=thread
  // keeps thread 0 producing.
  const char* pw_env = std::getenv("NF4KIT_WG_PRODUCER");
  const bool pw = BN == 128 && pack && !(pw_env != nullptr && !std::strcmp(pw_env, "thread"));
  auto pick = [&](auto sk_tag) {
    constexpr bool SK = decltype(sk_tag)::value;
    using S2 = std::integral_constant<int, 2>;
    using S1 = std::integral_constant<int, 1>;
    using S0 = std::integral_constant<int, 0>;
    if constexpr (BN == 128) {
      if (pw) {
        if (nested) go(&gemm4_wg_kernel<T, BN, 2, true, SK, true>, sk_tag, S2{}, C::kThreads + 32);
        else go(&gemm4_wg_kernel<T, BN, 2, false, SK, true>, sk_tag, S2{}, C::kThreads + 32);
        return;
      }
    }
    if (pack) {
      if (nested) go(&gemm4_wg_kernel<T, BN, 2, true, SK>, sk_tag, S2{});
      else go(&gemm4_wg_kernel<T, BN, 2, false, SK>, sk_tag, S2{});
    } else if (uniform) {
      if (nested) go(&gemm4_wg_kernel<T, BN, 1, true, SK>, sk_tag, S1{});
      else go(&gemm4_wg_kernel<T, BN, 1, false, SK>, sk_tag, S1{});
    } else {
      if (nested) go(&gemm4_wg_kernel<T, BN, 0, true, SK>, sk_tag, S0{});
      else go(&gemm4_wg_kernel<T, BN, 0, false, SK>, sk_tag, S0{});
    }
  };
  if (sk) pick(std::true_type{});
  else pick(std::false_type{});
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

  const PathChoice forced = path_override();
  Path path = forced.path;
  if (path == Path::Skinny && !mma_ok) path = Path::Auto;
  if (path == Path::TensorCore && !(mma_ok && ceil_div(a.N, 128) <= 65535)) path = Path::Auto;
  // The warpgroup kernel: sm_90 (setup.py builds every 9.0 target as sm_90a), grid within one dimension.
  const bool wg_ok = mma_ok && at::cuda::getCurrentDeviceProperties()->major == 9 &&
                     ceil_div(a.N, 128) * ceil_div(a.M, 64) < (int64_t{1} << 31) && a.M < (int64_t{1} << 31) &&
                     a.K < (int64_t{1} << 31) && a.N < (int64_t{1} << 31) && a.N * a.K < (int64_t{1} << 37);
  if (path == Path::Warpgroup && !wg_ok) path = Path::Auto;
  if (path == Path::Generic && ceil_div(a.M, kGenericRows) > 65535) path = Path::Auto;
  if (path == Path::Auto) {
    const int64_t sms = sm_count(), wg_n = wg_tiles(a.M, a.N);
    // 25..32 rows on long K with many row tiles: the warpgroup kernel (kWgFromM)
    const bool wg_early = wg_ok && a.M >= kWgFromM && a.K >= kWgLongK && wg_n * 2 >= sms;
    if (mma_ok && a.M <= kSkinnyAutoMaxM && !wg_early) path = Path::Skinny;
    else if (wg_ok && (a.M <= kWgMaxM || (a.M <= kWgMaxLongKM && a.K >= kWgLongK)) &&
             (wg_n * 2 >= sms || wg_stream_k_pays(wg_n, ceil_div(a.K, 64), wg_tile_n(a.M), sms)))
      path = Path::Warpgroup;
    else if (mma_ok && a.M <= kTcMaxM && ceil_div(a.N, 128) <= 65535 &&
             ceil_div(a.N, 128) * ceil_div(a.M, 64) * 2 >= sms)
      path = Path::TensorCore;
    else if (a.M <= 2 * kGenericRows) path = Path::Generic;
    else path = Path::Dequant;
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const GemmParams p = make_params(a, out, pk);
  if (path == Path::Dequant) {
    at::Tensor W = at::empty({a.N, a.K}, A.options());
    dequantize_4bit_into(a, W, stream);
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
      launch_skinny<T>(p, a.blocksize, stream);
    } else if (path == Path::Warpgroup) {
      const bool uniform = a.blocksize >= 64 && a.K % 64 == 0;
      const char* force_bn = std::getenv("NF4KIT_WG_BN");  // development aid: the batch tile
      const int64_t bn = force_bn != nullptr && *force_bn ? std::atoi(force_bn) : wg_tile_n(a.M);
      const int split = path == forced.path ? forced.split : -1;
      if (bn <= 64) launch_wg<T, 64>(p, uniform, split, stream);
      else if (bn <= 128) launch_wg<T, 128>(p, uniform, split, stream);
      else launch_wg<T, 256>(p, uniform, split, stream);
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
