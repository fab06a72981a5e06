// CUDA kernels of gemm_4bit: out[M, N] = A[M, K] @ W[N, K]^T (+ bias), W in bitsandbytes' packed
// 4-bit format (NF4 / FP4, any blocksize, float32 or nested absmax decoded in registers).
//
// Four kernels and one fallback, chosen by shape in gemm_4bit_cuda (the dispatch, with the
// measurements behind it, is at kSkinnyAutoMaxM):
//  * skinny (M <= 32; with many row tiles up to 8, 15 or 16 rows by shape: wg_from_m; 33..64 in one wide pass on short K with few row tiles;
//    fp16/bf16, K % 32 == 0; forced: any M, in slices of 32 or that wide pass): streams W once. A
//    block owns 32 rows of W (16 where 32 would leave most SMs idle) and its 8 warps take turns over
//    K; packed W reaches shared memory by
//    cp.async in whole lines, evict_first in L2 (a 4-stage ring inside the decode table's unused row halves), W is the
//    mma.sync A operand decoded through a per-lane byte -> pair table, the batch is the n side, and
//    with blocksize >= 64 the absmax scales each 64-wide group's float32 sums instead of every weight.
//    With 32-row blocks the prologue's loads are issued before the pair table is built (V2).
//  * warpgroup kernel (sm_90a, 32 < M <= 512, from 9, 16 or 17 rows with many row tiles, up to 2048 for K >= 8192;
//    batch tiles 32, 64, 128, 256: wg_tile_n): wgmma with W decoded
//    straight into the A registers, activations and packed W by TMA (W evict_first in L2 with one batch
//    tile; issued by a producer: a warp, a
//    warpgroup at batch tile 256; thread 0 where the scales are not packed), mbarriers (gemm_4bit_wgmma.cuh); one
//    block per tile, or stream-K over one block per SM where the tiles are few (wg_stream_k_pays),
//    or whole tiles for the full waves and stream-K over the last (wg_dp_stream_k_pays); at batch
//    tile 128 in DP + SK each warp loads the next k tile's packed words a step ahead (wg_prew_ok).
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
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../gemm_4bit.h"
#include "common.cuh"
#include "dequantize_4bit.cuh"
#include "gemm_4bit_common.cuh"
#include "gemm_4bit_mma.cuh"
#include "gemm_4bit_wg.cuh"

namespace nf4kit {
namespace cuda {
namespace gemm4 {
// The warpgroup kernel's launches are compiled in gemm_4bit_wg32/64/128/256.cu.
NF4KIT_WG_EXTERN(32)
NF4KIT_WG_EXTERN(64)
NF4KIT_WG_EXTERN(128)
NF4KIT_WG_EXTERN(256)

namespace {

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
// of the packed word and 4 l (the load adds the table's base, a uniform register, itself), and 32
// lanes hit 32 distinct banks.
// Packed W: the block copies each 32 x 256-byte stage with cp.async, 16 contiguous bytes per thread
// (whole 128-byte lines per warp instruction), into a 4-stage ring that lives in the table rows'
// unused upper halves; one barrier per stage. (Loading each lane's 8-byte pieces straight from
// global memory cost 8 L1 wavefronts per 256 bytes: ncu showed the L1 data pipe, not DRAM, as the
// limit.) The stage's absmax values are decoded once by the block into a small shared table.
constexpr int kSkinnyAny = 0, kSkinnyUniform = 1, kSkinnyWhole = 2;  // skinny_main's MODE
constexpr int kSkinnyWarps = 8;
constexpr int kSkinnyRows = 32;                             // W rows per block (ROWS = 32; or 16)
constexpr int kSkinnyGroup = 64;                            // k per warp per stage and group
// k per stage: 8 KB of packed W, 256 bytes of each of 32 rows (one group a warp) or 512 of 16 (two)
template <int ROWS>
constexpr int kSkinnyStageKOf = kSkinnyWarps * kSkinnyGroup * (kSkinnyRows / ROWS);
constexpr int kSkinnyStageK = kSkinnyStageKOf<kSkinnyRows>;
constexpr int kSkinnyStages = 4;
constexpr int kSkinnyMaxM = 32;                             // batch rows per launch (NT <= 4)
constexpr int kSkinnyWideM = 64;                            // ... in one wide launch (NT = 8)
constexpr int kWideTableBytes = 256 * 256;
constexpr uint32_t kSkinnyRingStride = 2 * kSkinnyRows * 256;  // 64 holes per stage
constexpr int kSkinnyScaleOffset = kWideTableBytes + 1024;      // scale tables, after code8
constexpr int kSkinnyScaleBytes = 2 * kSkinnyRows * (4 * kSkinnyWarps + 1) * 4;
static_assert(kSkinnyStages * kSkinnyRingStride == kWideTableBytes, "the ring fills the table's 256 holes");

// Byte offset, in the ring's stage 0, of a row, 128-byte part of its stage bytes (HPR parts: 2 of
// 256 bytes, 4 of 512), 32-byte slot in the part and 16-byte sub-chunk: the ring lives in the
// table's row holes (hole HPR row + part, at hole * 256 + 128), slots rotated by row so that the 4
// rows a half-warp reads back hit distinct banks.
template <int HPR>
__host__ __device__ constexpr uint32_t ring_offset(int row, int part, int slot, int sub) {
  return static_cast<uint32_t>((HPR * row + part) * 256 + 128 + ((slot ^ (row & 3)) * 32) + sub * 16);
}

inline size_t skinny_smem_bytes() { return kSkinnyScaleOffset + kSkinnyScaleBytes; }

template <typename T>
__device__ __forceinline__ void build_wide_table(uint8_t* smem, const float (&code)[16], float mul) {
  // Row v: lanes 0..31 hold the same pair (times mul), the rest of the row unused. Thread v builds
  // row v with one decode and 8 16-byte stores, in an order rotated by v so that the 8 rows of a
  // store phase hit distinct banks.
  for (int v = threadIdx.x; v < 256; v += blockDim.x) {
    const uint32_t pr = pack2<T>(code[v >> 4] * mul, code[v & 15] * mul);
    const uint4 q = make_uint4(pr, pr, pr, pr);
#pragma unroll
    for (int j = 0; j < 8; ++j) *reinterpret_cast<uint4*>(smem + v * 256 + (((j + v) & 7) << 4)) = q;
  }
}
// Byte b of w -> its pair, for the lane whose 4 l is lane4: tab + the PRMT result, which the shared
// load takes as [register + uniform register] (SASS: PRMT, LDS; the table never sits at shared
// address 0, where the dynamic shared memory starts after the 1 KB the driver reserves:
// kDynSmemBase).
__device__ __forceinline__ uint32_t wide_lookup(uint32_t tab, uint32_t lane4, uint32_t w, int b) {
  uint32_t r;
  asm("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(tab + __byte_perm(w, lane4, 0x5504u | (static_cast<uint32_t>(b) << 4))));
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

// ROWS = 16 (few output features, launch_skinny): a block owns 16 rows and each stage is 512 bytes
// of each; warp w takes groups 2w and 2w + 1 of the stage for the one m16 tile (the mt index below
// is then the group, not the row tile, and the two groups' sums meet at the end), with twice the
// activations per stage.
// V2 (launch_skinny: with 32-row blocks; NF4KIT_SKINNY_V=1 / 2 forces V1 / V2): every prologue
// load (the ring's first stages, the first absmax values, the nested code table, the first
// activations) is issued before the pair table is built, so that their latency hides behind the
// build. Same sums in the same order as V1.
template <typename T, int NT, int MODE, int ROWS, bool V2, bool NESTED>
__device__ __forceinline__ void skinny_main(const GemmParams& p, uint8_t* smem, const float mul) {
  constexpr bool UNIFORM = MODE >= kSkinnyUniform, WHOLE = MODE == kSkinnyWhole;
  constexpr bool FOLD = kSkinnyFold<NT, MODE>;
  constexpr int S = kSkinnyStages;
  constexpr int SK = kSkinnyStageKOf<ROWS>;
  constexpr int GPW = kSkinnyRows / ROWS;  // groups per warp per stage (= the act sets)
  constexpr int HPR = SK / 2 / 128;        // ring holes per row per stage
  constexpr int CPR = SK / 2 / 16;         // 16-byte chunks per row per stage
  static_assert(ROWS * SK / 2 == 8192 && (ROWS == 32 || ROWS == 16), "8 KB stages of 32 or 16 rows");
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int nstages = static_cast<int>((K + SK - 1) / SK);
  const uint32_t tab = mma::smem_addr(smem), lane4 = 4u * lane;
  constexpr bool nested = NESTED;
  float* code8 = reinterpret_cast<float*>(smem + kWideTableBytes);
  const float inv_mul = 1.0f / mul;
  float code_v = 0.0f, off = 0.0f;  // the nested code entry tid (V2: held until the table is built), offset

  // Copy side: thread t copies 16-byte chunks t and t + 256 of a stage (row id / CPR, chunk id % CPR
  // of the row's stage bytes); rows past N and k past K as zeros. Pointers and k advance per stage.
  const uint8_t* src[2];
  uint32_t dst[2];
  int kq[2];
  bool rok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int id = tid + 256 * i, row = id / CPR, q = id % CPR;
    rok[i] = n0 + row < N;
    src[i] = p.packed + (std::min<int64_t>(n0 + row, N - 1) * K) / 2 + 16 * q;
    kq[i] = 32 * q;
    dst[i] = tab + ring_offset<HPR>(row, q >> 3, (q & 7) >> 1, q & 1);
  }
  // W is read once: its copies go into L2 as evict_first (l2_read_policy). The other modes' partial
  // rows and stages take a separate zero-fill copy with no policy: the zero-fill operand and the
  // cache hint in one instruction made ptxas 13.0 emit the copy in the loop as LDGSTS [R + UR0],
  // desc[UR1] with UR0 / UR1 never written, an illegal instruction on the H200 (twenty-second session).
  const uint64_t w_policy = l2_read_policy(p.w_evict_first != 0);
  int s_issue = 0;
  int64_t k_issue = 0;
  auto issue = [&]() {
    if (s_issue < nstages) {
      const uint32_t si = static_cast<uint32_t>(s_issue & (S - 1));
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool ok = WHOLE || (rok[i] && k_issue + kq[i] < K);
        if (ok) {
          asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst[i] + si * kSkinnyRingStride),
                       "l"(src[i]), "l"(w_policy)
                       : "memory");
        } else {  // zeros
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, 0;\n" ::"r"(dst[i] + si * kSkinnyRingStride), "l"(p.packed)
                       : "memory");
        }
      }
    }
    mma::cp_async_commit();
    ++s_issue;
    k_issue += SK;
#pragma unroll
    for (int i = 0; i < 2; ++i) src[i] += SK / 2;
  };

  // Compute side: warp w takes group w of every stage (ROWS 16: groups 2w, 2w + 1); the lane reads
  // its 8 bytes of each of its 4 (row, group) slots r back (rows n0 + 16 (r / 2) + 8 (r % 2) + g;
  // ROWS 16: row n0 + 8 (r % 2) + g of group 2w + r / 2), and their scales from the block's table.
  auto slot_row = [&](int r) { return (ROWS == 32 ? 16 * (r >> 1) : 0) + 8 * (r & 1) + g; };
  auto slot_group = [&](int r) { return ROWS == 32 ? w : 2 * w + (r >> 1); };
  uint32_t rd[4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
    rd[r] = tab + ring_offset<HPR>(slot_row(r), slot_group(r) >> 2, slot_group(r) & 3, 0) + 8 * c;
  // the lane's k in the stage whose activations load next (of its first group)
  int64_t k_lane = static_cast<int64_t>(w) * GPW * kSkinnyGroup + 16 * c;
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
  constexpr int UN = (UNIFORM ? 1 : 4) * kSkinnyWarps * GPW;  // units per row per stage
  constexpr int US = UN + 1;                                  // row stride (no bank conflicts)
  constexpr int EPT = ROWS * UN / (kSkinnyWarps * 32);        // entries per thread
  static_assert(2 * ROWS * US * 4 <= kSkinnyScaleBytes, "the scale tables fit");
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
      sct[buf * ROWS * US + eo[i]] =
          !okv[i] ? 0.0f : (nested ? nested_absmax_value(code8[qv[i]], vv[i], off) : vv[i]) * inv_mul;
  };
  // The lane's entries: its slots' rows, unit = the group (UNIFORM) or 4 group + c.
  int sco[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) sco[r] = slot_row(r) * US + (UNIFORM ? slot_group(r) : 4 * slot_group(r) + c);

  // The lane's activations of a stage (k = k_lane + 64 gi .. + 15 of rows 8 nt + g, per group gi),
  // loaded at the end of the stage before, so that their latency hides behind the barrier and the
  // decode; 0 past M or K (the upper lanes/warps of a partial last stage). Each load moves k_lane
  // and ap on by a stage.
  uint4 act[GPW][2][NT];
  auto load_act = [&](bool stage_ok) {
#pragma unroll
    for (int gi = 0; gi < GPW; ++gi) {
      const bool live = stage_ok && (WHOLE || k_lane + gi * kSkinnyGroup < K);
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          act[gi][half][nt] = (live && aok[nt]) ? __ldg(reinterpret_cast<const uint4*>(ap[nt]) + 8 * gi + half)
                                                : make_uint4(0u, 0u, 0u, 0u);
    }
    k_lane += SK;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) ap[nt] += 2 * SK;
  };

  // Prologue. V1: the pair table and the nested code table, a barrier, then the loads. V2: the
  // loads first (copies, absmax, activations, the nested code into a register), then the tables.
  auto tables = [&]() {
    build_wide_table<T>(smem, p.code, mul);
    if (!V2) off = stage_nested(p.absmax, code8);
    else if (nested) code8[tid] = code_v;  // blockDim.x == 256
    __syncthreads();
  };
  if (!V2) tables();
  load_act(true);
#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue();
  raw();
  if (V2 && nested) {
    code_v = __ldg(p.absmax.nested_code + tid);
    off = __ldg(p.absmax.offset);
  }
  if (V2) tables();

  float acc[2][NT][4];
  zero_tiles(acc);

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
      for (int r = 0; r < 4; ++r) sc[r] = sct[(s & 1) * ROWS * US + sco[r]];
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
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {  // step j = 2 half + jj: bytes 2j, 2j + 1 = word half, bytes 2jj, 2jj + 1
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {  // ROWS 16: the group
            const uint4* bq = act[GPW == 1 ? 0 : mt][half];
            const uint32_t wlo = half ? wv[2 * mt].y : wv[2 * mt].x;
            const uint32_t whi = half ? wv[2 * mt + 1].y : wv[2 * mt + 1].x;
            uint32_t a[4];
            a[0] = wide_lookup(tab, lane4, wlo, 2 * jj);
            a[1] = wide_lookup(tab, lane4, whi, 2 * jj);
            a[2] = wide_lookup(tab, lane4, wlo, 2 * jj + 1);
            a[3] = wide_lookup(tab, lane4, whi, 2 * jj + 1);
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
    load_act(s + 1 < nstages);
  }
  mma::cp_async_wait<0>();

  // Sum the 8 warps' shares in shared memory (reusing the table) and store. ROWS 16: the two groups'
  // sums of the one row tile first.
  constexpr int MTS = ROWS / 16;  // row tiles
  if constexpr (ROWS == 16) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[0][nt][e] += acc[1][nt][e];
  }
  constexpr int E = MTS * NT * 4;
  float* red = reinterpret_cast<float*>(smem);
  __syncthreads();
  if (w > 0) {
#pragma unroll
    for (int mt = 0; mt < MTS; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[(w * E + (mt * NT + nt) * 4 + e) * 32 + lane] = acc[mt][nt][e];
  }
  __syncthreads();
  if (w == 0) {
    for (int w2 = 1; w2 < kSkinnyWarps; ++w2) {
#pragma unroll
      for (int mt = 0; mt < MTS; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] += red[(w2 * E + (mt * NT + nt) * 4 + e) * 32 + lane];
    }
#pragma unroll
    for (int mt = 0; mt < MTS; ++mt) {
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

// Three blocks per SM at one n8 tile (shared memory allows three: 73.3 KB each), two at 2-4, one at
// 8 (the wide launch: 64 accumulators and 64 activation registers a thread).
template <typename T, int NT, int MODE, int ROWS, bool V2>
__global__ void __launch_bounds__(kSkinnyWarps * 32, NT == 1 ? 3 : (NT <= 4 ? 2 : 1))
    gemm4_skinny_kernel(const GemmParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const float mul = kSkinnyFold<NT, MODE> ? p.code_mul : 1.0f;
  const bool nested = p.absmax.absmax_f32 == nullptr;
  if (nested) skinny_main<T, NT, MODE, ROWS, V2, true>(p, smem, mul);
  else skinny_main<T, NT, MODE, ROWS, V2, false>(p, smem, mul);
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
            v0 += bias_at<T>(p, n);
            v1 += bias_at<T>(p, n + 1);
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
//                Since the seventeenth session 17..32 (since the nineteenth 12..32; since the
//                twenty-second 16..32 where the skinny kernel runs whole stages; since the
//                twenty-fourth 9..32, 16..32 or 17..32 by shape: wg_from_m) go to the
//                warpgroup kernel at batch tile 32 where it has at least half a block per SM.
//   33..512      warpgroup kernel (sm_90), when it has at least half a block per SM: 8192x28672 at
//                M=64/128/256/512: 0.103/0.155/0.219/0.436 ms vs 0.280/0.291/0.348/0.502 ms for
//                dequantize + cuBLAS (the mma.sync tensor-core kernel: 0.214 ms at 64, 0.41 at 128).
//                With fewer blocks (N = 4096: 32 row tiles) stream-K where it measured faster
//                (wg_stream_k_pays, seventh session), else dequantize + cuBLAS; with one to four
//                waves of tiles at batch tile 256 and K >= 8192, DP + SK (wg_dp_stream_k_pays, eighth;
//                up to eight waves at batch tile 256 since the tenth session).
//   513..2048    the warpgroup kernel when K >= 8192 (8192x28672 at 1024: 0.763 vs 0.849 ms; 14336x4096:
//                0.190 vs 0.204), else dequantize + cuBLAS (4096x14336 at 1024: 0.205 vs 0.220 ms).
//                1025..2048 since the eleventh session, with DP + SK at any number of waves at batch
//                tile 256 (H100, 5 interleaved rounds, h100/ab_paths_big_batch.log: 8192x28672 at 2048
//                1.5037 ms vs 1.5473 one block per tile and 1.5574 dequantize + cuBLAS; 14336x4096 at
//                2048 0.3826 vs 0.3947).
//   larger       dequantize + cuBLAS (8192x28672 at 4096: 3.01 vs 3.42 ms for the warpgroup kernel; with
//                the producer warpgroup and DP + SK, H100, eleventh session, 5 rounds: 2.8631 vs 2.9961;
//                14336x4096 at 4096 0.7576 vs 0.7633).
//   33..64 with K < 8192 and under half a block per SM for the warpgroup kernel (4096x4096): the
//                skinny kernel in one wide pass (below, at `wide`; fourteenth session).
//   33..64 without sm_90: the mma.sync tensor-core kernel as before.
constexpr int64_t kSkinnyAutoMaxM = 32;
// From 12 rows on (17 before the nineteenth session), with many row tiles, the warpgroup kernel at
// batch tile 32 (wg_tile_n). H200, seventeenth session, 5 interleaved rounds
// (h200/experiments/ab_paths_tile32_run1.log and ab_builds_s17_run1.log), fp16, ms: 8192x28672 at 24 /
// 32 0.0752 / 0.0759 against 0.0912 (skinny, four n8 tiles) / 0.0881 (batch tile 64); 4096x14336 at
// 24 / 32 0.0316 / 0.0322 against 0.0342 / 0.0370 (skinny). Not then at 9..16, where the skinny kernel
// with two n8 tiles was ahead (8192x28672 at 9 / 16 0.0687 / 0.0725 against 0.0750 / 0.0751); not
// with few row tiles (14336x4096: 32 of them, 0.089 ms one block per tile against the skinny kernel's
// 0.034; with stream-K ~0.031 ms in two A/Bs and ~0.039 in a third, eighteenth session, so not taken
// either). Before: 25..32 on K >= 8192 at batch tile 64 (ninth session). Nineteenth session (HALVES
// at batch tile 32, two blocks an SM; 5 interleaved rounds, h200/experiments/ab_paths_halves_run1.log
// and ab_paths_s19_run2.log), skinny against batch tile 32: 8192x28672 at 9 / 12 / 16 0.0680 / 0.0698
// / 0.0716 against 0.0673 / 0.0670 / 0.0671; 4096x14336 (SOLO) at 12 / 16 0.0259 / 0.0276 against
// 0.0266 / 0.0266 (eighteenth session, ab_paths_9_16_mr112_run1.log: at 9 0.0249 against 0.0265).
// One threshold for both: 12 gains 4-7% on the first at 12..16 and costs the second ~3% at 12..13.
// Since the twenty-fourth session: 9, for shapes with packed warpgroup scales and without whole
// skinny stages (below).
constexpr int64_t kWgFromM = 9;
// ... and from 16 where the skinny kernel runs whole stages and row tiles (kSkinnyWhole: blocksize
// >= 64, K % 512 == 0, N % 32 == 0), whose copies are evict_first in L2 since the twenty-second
// session. H200, 7 interleaved rounds (h200/experiments/ab_paths_12_16_s22_run6.txt), skinny against
// batch tile 32, ms, fp16 (bf16 alike): 8192x28672 at 12 / 14 / 15 / 16 0.0640 / 0.0655 / 0.0664 /
// 0.0672 against 0.0673 / 0.0668 / 0.0668 / 0.0671; 4096x14336 0.0248 / 0.0256 / 0.0256 / 0.0260
// against 0.0262 / 0.0268 / 0.0265 / 0.0263.
// Twenty-fourth session, after both kernels' reads of W became evict_first in every mode (H200, 5-7
// interleaved rounds, h200/experiments/ab_paths_thresholds_s24_run{1,2,3}.txt, skinny against batch
// tile 32, fp16, ms), three cases by what the warpgroup kernel runs with (wg_from_m):
//  * whole skinny stages, packed warpgroup scales (wg_packed_scales_shape): from 16 still. 8192x28672
//    at 12 / 14 / 15 / 16 0.0642 / 0.0665 / 0.0671 / 0.0674 against 0.0680 / 0.0685 / 0.0684 / 0.0679;
//    4096x14336 0.0253 / 0.0255 / 0.0257 / 0.0258 against 0.0245 / 0.0250 / 0.0245 / 0.0249.
//  * packed scales without whole skinny stages: from 9 (was 12), where the skinny kernel takes a second
//    n8 tile. 8192x28656 at 8 / 9 / 10 / 11 0.0599 / 0.0721 / 0.0731 / 0.0742 against 0.0678 / 0.0685 /
//    0.0680 / 0.0681 (bf16 at 9 0.0720 against 0.0686); 4096x14328 at 9 / 10 / 11 0.0262 / 0.0271 /
//    0.0267 against 0.0247 / 0.0252 / 0.0252; 14336x14328 level (at 9 0.0671 against 0.0668).
//  * no packed scales (blocksize != 64, or K % 256 != 0; thread 0 produces): from 17 (was 12), where
//    the skinny kernel takes a third n8 tile. 8000x28672 at 12 / 16 / 20 0.0786 / 0.0810 / 0.0926
//    against 0.0828 / 0.0825 / 0.0830; blocksize 128 8192x28672 at 12 / 16 / 20 0.0633 / 0.0662 /
//    0.0854 against 0.0823 / 0.0826 / 0.0828; blocksize 32 8192x28672 at 12 / 16 / 20 0.0951 / 0.0987 /
//    0.1253 against 0.1116 / 0.1118 / 0.1116.
constexpr int64_t kWgFromMWhole = 16, kWgFromMUnpacked = 17;
constexpr int64_t kWgMaxM = 512, kWgMaxLongKM = 2048, kWgLongK = 8192;
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
  p.bias = a.bias.defined() ? a.bias.data_ptr() : nullptr;
  p.bias_t = a.bias.defined() && a.bias.scalar_type() != at::kFloat;  // then A's dtype (gemm_4bit_cuda)
  p.out = out.data_ptr();
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.bs_shift = __builtin_ctzll(static_cast<unsigned long long>(a.blocksize));
  const Code4Tables t = make_code4_tables(a.qt);
  for (int i = 0; i < 16; ++i) p.code[i] = t.decode[i];
  p.code_mul = a.qt == QuantType::FP4 ? 6.0f : 1.0f;
  const char* ef = std::getenv("NF4KIT_L2_EVICT_FIRST");  // development aid: 0 = the default L2 policy
  p.w_evict_first = ef != nullptr && !std::strcmp(ef, "0") ? 0 : 1;
  return p;
}

// The skinny kernel's modes by shape. UNIFORM (kSkinnyUniform): one absmax per (row, 64-wide group),
// so the lanes share it and up to 16 rows it multiplies the group's float32 sums instead of each pair
// of codes (and 32-element scale indices fit in 32 bits). WHOLE (kSkinnyWhole): also whole stages and
// whole blocks of `rows` rows (32 or 16), so no bounds checks in the loop. The dispatch asks for 32 rows.
inline bool skinny_uniform_shape(int64_t blocksize, int64_t K, int64_t N) {
  return blocksize >= kSkinnyGroup && K % kSkinnyGroup == 0 && N * K < (int64_t{1} << 37);
}
inline bool skinny_whole_shape(int64_t blocksize, int64_t K, int64_t N, int rows) {
  const int64_t stage_k = rows == 16 ? kSkinnyStageKOf<16> : kSkinnyStageK;
  return skinny_uniform_shape(blocksize, K, N) && K % stage_k == 0 && N % rows == 0;
}

// The first batch from which the warpgroup kernel at batch tile 32 takes over from the skinny kernel
// where it has many row tiles (kWgFromM, kWgFromMWhole, kWgFromMUnpacked).
inline int64_t wg_from_m(int64_t blocksize, int64_t K, int64_t N) {
  if (!wg_packed_scales_shape(blocksize, K)) return kWgFromMUnpacked;
  return skinny_whole_shape(blocksize, K, N, kSkinnyRows) ? kWgFromMWhole : kWgFromM;
}

template <typename T, int NT, int MODE, int ROWS>
void launch_skinny_slice(const GemmParams& p, bool v2, cudaStream_t stream) {
  auto* kernel = v2 ? &gemm4_skinny_kernel<T, NT, MODE, ROWS, true> : &gemm4_skinny_kernel<T, NT, MODE, ROWS, false>;
  allow_smem(kernel, static_cast<int>(skinny_smem_bytes()));
  const int64_t blocks = ceil_div(p.N, ROWS);
  kernel<<<static_cast<unsigned>(blocks), kSkinnyWarps * 32, skinny_smem_bytes(), stream>>>(p);
  NF4KIT_LAUNCH_CHECK();
}

// The batch in slices of at most 32 rows, each one pass over W; wide: 33..64 rows in one pass (NT = 8;
// the dispatch checks the range).
template <typename T>
void launch_skinny(const GemmParams& p, int64_t blocksize, bool wide, cudaStream_t stream) {
  const bool uniform = skinny_uniform_shape(blocksize, p.K, p.N);
  const char* force = std::getenv("NF4KIT_SKINNY_MODE");  // development aid: "uniform" skips kSkinnyWhole
  // Blocks of 16 rows (512 bytes of each a stage) up to batch 16 where 32-row blocks would fill at
  // most half of the SMs' block slots (3 a SM at batch <= 8, 2 at 9-16): few output features. H100,
  // eleventh session, 5-7 interleaved rounds (h100/ab_paths_skinny_rows16.log), 32 -> 16 rows:
  // 14336x4096 (128 tiles of 32 rows) at batch 1 / 8 / 16 0.0275 / 0.0311 / 0.0329 -> 0.0231 / 0.0268 /
  // 0.0271 ms, 4096x4096 level; with a wave or more of 32-row blocks slower, 8192x28672 (896 tiles)
  // 0.0682 / 0.0685 / 0.0817 -> 0.0690 / 0.0749 / 0.0940, 4096x14336 (448) 0.0267 / 0.0275 / 0.0308 ->
  // 0.0277 / 0.0309 / 0.0364. Development aid: NF4KIT_SKINNY_ROWS=16 or 32 forces either.
  const char* rows_env = std::getenv("NF4KIT_SKINNY_ROWS");
  // V2's prologue (skinny_main) with 32-row blocks; 16-row blocks keep V1's. H200, twelfth session,
  // 7 interleaved rounds (h200/ab_paths_skinny_v2.log, run 4), V1 -> V2, ms: 8192x28672 at batch
  // 1 / 8 0.0526 / 0.0587 -> 0.0514 / 0.0573, 4096x14336 at 16 / 24 0.0279 / 0.0336 -> 0.0268 / 0.0331;
  // 14336x4096 (16-row blocks) at 8 0.0236 -> 0.0262. Development aid: NF4KIT_SKINNY_V=1 or 2 forces either.
  const char* v_env = std::getenv("NF4KIT_SKINNY_V");
  const int rows_forced = rows_env == nullptr ? 0 : std::atoi(rows_env);
  const int64_t sms = sm_count();
  const int64_t slice = wide ? p.M : kSkinnyMaxM;  // wide: the whole batch (33..64, the dispatch's check)
  for (int64_t m0 = 0; m0 < p.M; m0 += slice) {
    GemmParams q = p;
    q.M = std::min<int64_t>(slice, p.M - m0);
    q.A = p.A + m0 * p.K * static_cast<int64_t>(sizeof(T));
    q.out = static_cast<uint8_t*>(p.out) + m0 * p.N * static_cast<int64_t>(sizeof(T));
    const int64_t slots = sms * (q.M <= 8 ? 3 : 2);
    const bool rows16 = q.M <= 16 && (rows_forced == 16 || (rows_forced != 32 && 2 * ceil_div(p.N, kSkinnyRows) <= slots));
    const int rows = rows16 ? 16 : kSkinnyRows;
    const bool v2 = v_env != nullptr && *v_env ? std::strcmp(v_env, "1") != 0 : !rows16;
    const bool whole = skinny_whole_shape(blocksize, p.K, p.N, rows) && !(force != nullptr && !std::strcmp(force, "uniform"));
    auto go = [&](auto mode_tag) {
      constexpr int MODE = decltype(mode_tag)::value;
      if (q.M <= 8) {
        if (rows16) launch_skinny_slice<T, 1, MODE, 16>(q, v2, stream);
        else launch_skinny_slice<T, 1, MODE, kSkinnyRows>(q, v2, stream);
      } else if (q.M <= 16) {
        if (rows16) launch_skinny_slice<T, 2, MODE, 16>(q, v2, stream);
        else launch_skinny_slice<T, 2, MODE, kSkinnyRows>(q, v2, stream);
      } else if (q.M <= kSkinnyMaxM) {
        launch_skinny_slice<T, 4, MODE, kSkinnyRows>(q, v2, stream);
      } else {
        launch_skinny_slice<T, 8, MODE, kSkinnyRows>(q, v2, stream);
      }
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

// The warpgroup kernel's wide pair table (batch tiles 64 and 128) sits where the dynamic shared
// memory starts, which its lookups take as the constant kDynSmemBase: a one-thread kernel looks once
// per device (a call on a stream being captured into a CUDA graph does not synchronise: it takes
// batch tile 256 until a plain call has looked). Development aid: NF4KIT_WG_WIDE=0 answers no.
__global__ void dyn_smem_base_kernel(uint32_t* out) {
  extern __shared__ __align__(16) uint8_t smem[];
  *out = mma::smem_addr(smem);
}
bool wg_wide_table_ok(cudaStream_t stream) {
  const char* env = std::getenv("NF4KIT_WG_WIDE");
  if (env != nullptr && !std::strcmp(env, "0")) return false;
  static std::mutex mu;
  static std::map<int, bool> known;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mu);
  if (const auto it = known.find(dev); it != known.end()) return it->second;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
  at::Tensor base = at::empty({1}, at::TensorOptions().device(at::kCUDA, dev).dtype(at::kInt));
  dyn_smem_base_kernel<<<1, 1, 16, stream>>>(reinterpret_cast<uint32_t*>(base.data_ptr<int>()));
  NF4KIT_LAUNCH_CHECK();
  return known[dev] = base.item<int>() == static_cast<int>(kDynSmemBase);
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
  // The kernels read the bias in A's dtype or in float32; another dtype is cast here (a cast each call).
  if (a.bias.defined() && a.bias.scalar_type() != dtype && a.bias.scalar_type() != at::kFloat)
    a.bias = a.bias.to(at::kFloat);
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
  // 33..64 rows where the warpgroup kernel has under half a block per SM and K is short (its
  // stream-K then has few k tiles to share out): the skinny kernel in one wide pass (NT = 8). H200,
  // fourteenth session, 7 interleaved rounds (h200/experiments/ab_paths_skinny_wide.log), fp16, ms,
  // wide vs the dispatch before it (stream-K / dequantize + cuBLAS): 4096x4096 at 33 / 48 / 64
  // 0.0195 / 0.0209 / 0.0217 vs 0.0316 / 0.0322 / 0.0259 (cuBLAS 0.0196 / 0.0197 / 0.0186); on long
  // K it lost (14336x4096 at 48 / 64: 0.0440 / 0.0470 vs 0.0423 / 0.0426), and with many row tiles
  // too (4096x14336 at 64: 0.0703 vs 0.0371). Development aid: NF4KIT_SKINNY_WIDE=0 / 1 turns it
  // off / forces it (33..64 rows).
  const int64_t sms = sm_count();
  const char* wide_env = std::getenv("NF4KIT_SKINNY_WIDE");
  const bool wide_rows = mma_ok && a.M > kSkinnyMaxM && a.M <= kSkinnyWideM;  // what the wide pass can take
  const bool wide = wide_rows && (wide_env != nullptr && *wide_env
                                      ? std::strcmp(wide_env, "0") != 0
                                      : wg_ok && a.K < kWgLongK && wg_tiles(a.M, a.N) * 2 < sms);
  if (path == Path::Auto) {
    const int64_t wg_n = wg_tiles(a.M, a.N);
    // from 9, 16 or 17 rows by shape (wg_from_m) to 32 with many row tiles: the warpgroup kernel at
    // batch tile 32
    const bool wg_early = wg_ok && a.M >= wg_from_m(a.blocksize, a.K, a.N) && wg_n * 2 >= sms;
    if (mma_ok && ((a.M <= kSkinnyAutoMaxM && !wg_early) || wide)) path = Path::Skinny;
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
      launch_skinny<T>(p, a.blocksize, wide, stream);
    } else if (path == Path::Warpgroup) {
      const bool uniform = a.blocksize >= 64 && a.K % 64 == 0;
      const char* force_bn = std::getenv("NF4KIT_WG_BN");  // development aid: the batch tile
      int64_t bn = force_bn != nullptr && *force_bn ? std::atoi(force_bn) : wg_tile_n(a.M);
      if (wg_wide(bn) && !wg_wide_table_ok(stream)) bn = 256;
      const int split = path == forced.path ? forced.split : -1;
      if (bn <= 32) launch_wg<T, 32>(p, uniform, split, stream);
      else if (bn <= 64) launch_wg<T, 64>(p, uniform, split, stream);
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
}  // namespace gemm4
}  // namespace cuda

TORCH_LIBRARY_IMPL(nf4kit, CUDA, m) { m.impl("gemm_4bit", &cuda::gemm4::gemm_4bit_cuda); }

}  // namespace nf4kit
