// The fused 4-bit matmul's warpgroup kernel (sm_90a) and its host launch, launch_wg<T, BN>: the
// kernel is described below and its wgmma pipeline in gemm_4bit_wgmma.cuh; the dispatch that calls
// it is gemm_4bit_cuda in gemm_4bit.cu. Compiled in four units, one per batch tile
// (gemm_4bit_wg32/64/128/256.cu, NF4KIT_WG_INSTANTIATE), so that a build compiles them in parallel
// (with three batch tiles, its 72 kernel instantiations were 83% of gemm_4bit.cu's SASS when they
// lived there).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "gemm_4bit_common.cuh"
#include "gemm_4bit_wgmma.cuh"

namespace nf4kit {
namespace cuda {
namespace gemm4 {

// =============================================================================================
// Warpgroup kernel (sm_90a; the wgmma pipeline is described in gemm_4bit_wgmma.cuh)
// =============================================================================================
// Shared memory: the activation ring (S x BN rows of 128 bytes, 1024-byte aligned for the swizzle),
// the packed-W ring (S x 128 rows of 32 bytes), the pair table (32 KB), code8, the mbarriers; at
// batch tiles 32, 64 and 128 (wg_wide) the 64 KB pair table first, then the rings (at 32 and 64
// code8 and the mbarriers in the table rows' unused halves).
// Stages: 6 at batch tile 32 and 4 at 64 (two blocks per SM fit: 112 KB each; at 64, 6 with the
// 32 KB table before the sixteenth session; stream-K at 64 on the wide table since the seventeenth,
// H200, 4 rounds, h200/experiments/ab_builds_s17_run1.log: 14336x4096 at 48 / 64 0.0398 / 0.0400 ->
// 0.0390 / 0.0396 ms), 5 at 256 (the most that fit), 8 at 128 with
// one block per tile (ncu source counters at batch 128, eighth session: 13% of the warps' samples
// waited for a tile's copies with 5; 8 stages took 8192x28672 at batch 128 from 0.1653 to 0.1542 ms,
// median of 7 interleaved rounds, benchmarks/results/h200/experiments/ab_paths_run3.log), and 8 for
// stream-K at 128 with the packed scales (SCALES 2; H100, ninth session, 5 interleaved rounds:
// 14336x4096 at batch 96 / 128 0.0502 / 0.0508 -> 0.0492 / 0.0499 ms, h100/ab_paths_sk8.log);
// stream-K with the other scale modes keeps 5.
constexpr int wg_stages(int bn, bool sk, int scales = 2) {
  return bn == 32 ? 6 : bn == 64 ? 4 : bn == 128 && (!sk || scales == 2) ? 8 : 5;
}
// The 64 KB pair table (WgCfg::kWide): batch tiles 32, 64 and 128, with their stages above (the
// static_asserts below check that it fits); the host falls back to 256 where it cannot be used.
constexpr bool wg_wide(int bn) { return bn <= 128; }
template <int BN, int STAGES = wg_stages(BN, false)>
struct WgCfg {
  static constexpr int kRows = 128, kBK = 64, kThreads = 256;
  static constexpr int kStages = STAGES;
  static constexpr int kAStage = BN * 128;
  static constexpr int kWStage = kRows * 32;
  // kWide (wg_wide, where 64 KB fit): the pair table with 256-byte rows (entry v of lane l at
  // 256 v + 4 l) first, at shared address kDynSmemBase, so that a lookup's address is one PRMT and
  // the load's immediate (wg_lookup); else 128-byte rows after the rings, whose PRMT result takes a
  // shift and an add (lookup_sel: one LEA.HI). kHoles (wide at batch tile 32 or 64, two blocks an SM):
  // code8 in the unused upper halves of the table's rows 0..7 (entry q at float q + (q & 0xE0) from
  // kCode8Off: code8_index), the 2 S mbarriers in row 8's, and no room to align the base (the kernel
  // asserts it is kDynSmemBase, 1024-aligned).
  static constexpr bool kWide = wg_wide(BN), kHoles = kWide && BN <= 64;
  static constexpr int kTabRowWords = kWide ? 64 : 32;
  static constexpr int kTabBytes = 256 * 4 * kTabRowWords;
  static constexpr int kAOff = kWide ? kTabBytes : 0;
  static constexpr int kWOff = kAOff + kStages * kAStage;
  static constexpr int kTabOff = kWide ? 0 : kWOff + kStages * kWStage;
  static constexpr int kCode8Off = kHoles ? 128 : kWide ? kWOff + kStages * kWStage : kTabOff + kTabBytes;
  static constexpr int kBarOff = kHoles ? 8 * 256 + 128 : kCode8Off + 1024;
  static_assert(!kHoles || 16 * kStages <= 128, "the mbarriers fit in a row's upper half");
  static constexpr int kSmem = kHoles ? kWOff + kStages * kWStage
                                      : kBarOff + 16 * kStages + 1024;  // + room to align the base to 1024
  static_assert(kSmem <= 227 * 1024, "within sm_90's 227 KB of shared memory a block");
  static_assert(BN > 64 || 2 * (kSmem + 1024) <= 228 * 1024, "two blocks an SM at batch tiles 32 and 64");
  static constexpr int kGroupM = 4;                      // raster: 4 batch tiles share a W tile's pass
  static constexpr int kLookahead = 4;                   // tiles between a scale's load and its use
};
// Threads of a block: the two consumer warpgroups (kThreads), plus the producer (PW): one warp at
// batch tiles 32, 64 and 128, a whole warpgroup at 256, so that setmaxnreg can move its registers
// to the consumers there (at 288 threads ptxas allots 168 registers a thread, and batch tile 256
// needs up to 254: 384 threads with 232 for the consumers (up to 219 used, no spill) and 40 for the
// producers).
constexpr bool wg_producer_warpgroup(int bn) { return bn == 256; }
// Registers a thread at batch tiles 32 and 64 with the producer warp, one block per tile: 288 threads
// a block (9 warps). The SM allots registers per quarter (16K, warps spread over its four
// schedulers): two blocks (18 warps, 5 a quarter) fit up to 96 registers a thread; at 104-112 a
// quarter holds 4 warps, 16 an SM, so one block. Under the launch bound (288, 2) ptxas takes 76-80 and
// serialises the wgmma (C7511 / C7512: every HGMMA followed by WARPGROUP.DEPBAR.LE 0); a cap of 96
// (__maxnreg__) changes nothing (76-79, still serialised). SOLO (launch_wg: the grid has at most one
// block an SM) takes __maxnreg__(112): batch tile 32 then uses 110-112 and its wgmma is not serialised
// (64 still is, at 91-95); on 224 tiles (8192x28672) every block at 112, one block an SM, ran 14%
// slower than two blocks at 80. Elsewhere the bound asks for one block an SM and there is no
// register limit (255). The kernels outside SOLO compile to the same SASS as before it (eighteenth
// session, cuobjdump, wg32 unit).
// wg_two_blocks: the producer-warp kernels that run two blocks an SM unless SOLO.
constexpr bool wg_two_blocks(int bn, bool pw, bool sk) { return bn <= 64 && pw && !sk; }
constexpr int wg_min_blocks(int bn, bool pw, bool sk, bool solo) { return wg_two_blocks(bn, pw, sk) && !solo ? 2 : 1; }
constexpr int wg_max_regs(int bn, bool pw, bool sk, bool solo) { return wg_two_blocks(bn, pw, sk) && solo ? 112 : 255; }
// HALVES: the producer-warp kernels at batch tiles 32 and 64 whose wgmma ptxas serialised (two
// blocks an SM; SOLO at 64: 91-95 registers) decode and multiply a k tile in two halves of two k16
// steps, each its own wgmma group, so that one half is in flight while the other is decoded: 16 A
// registers and 8 of packed words live instead of 32 and 16. nvcc 13.0, sm_90a: no C7511 / C7512
// left; batch tile 32 at two blocks an SM 72-80 registers, its loop's HGMMA in pairs with DEPBAR.LE 1
// (before: each HGMMA followed by DEPBAR.LE 0); 64 91-92. The same sums in the same order (k16 steps
// 0..3 into one accumulator). H200, nineteenth session, 5 interleaved rounds, one process per build
// (h200/experiments/ab_builds_halves_run1.log), fp16, ms: 8192x28672 at 17 / 24 / 32 0.0684 / 0.0690 /
// 0.0694 -> 0.0671 / 0.0673 / 0.0681; 4096x14336 (SOLO at 32: not HALVES) level.
constexpr bool wg_halves(int bn, bool pw, bool sk, bool solo) {
  return wg_two_blocks(bn, pw, sk) && (!solo || bn == 64);
}
// PREW (launch_wg: batch tile 128, the producer warp and packed scales, DP + SK; NF4KIT_WG_PREW=1 / 0
// forces it on / off wherever it can run): the next iteration's packed words are loaded at the end of a
// step, after its wgmma is issued and before waiting for the group before it, so that a step's lookups
// do not wait for its LDS.128 (ncu source counters at batch 128, h200/experiments/
// ncu_source_wgdp_128_1024_s20_run6.txt: 23% of the warps' samples on shared-memory results, the
// words' PRMTs among the top instructions). 16 more registers (163-168, no spill); the same sums in the
// same order. The ring needs at least 3 stages (slot j + 1 is waited for before slot j - 1 is released).
// H200, twenty-first session, main -> PREW at batch tiles 128 and 256 in every mode, 4 rounds, one
// process per build and round (h200/experiments/ab_builds_prew_s21_run2.log, _run3.log; fp16, ms):
// 8192x28672 at 128 (DP + SK) 0.1196 / 0.1190 -> 0.1157 / 0.1152 in two runs, every round faster;
// but 4096x14336 at 128 (one block per tile, 112 tiles) 0.0345 / 0.0343 -> 0.0354 / 0.0354 and 8192x28672
// at 256 0.1817 / 0.1795 -> 0.1840 / 0.1823, slower in both runs. So only where it gained.
constexpr bool wg_prew_ok(int bn, bool pw, int scales) { return bn == 128 && pw && scales == 2; }
template <int BN, bool PW>
constexpr int kWgThreads = WgCfg<BN>::kThreads + (!PW ? 0 : wg_producer_warpgroup(BN) ? 128 : 32);

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
// PW: a producer issues the copies of every slot, the whole ring ahead (warp 8 lane 0; at batch
// tile 256 a whole third warpgroup, see kWgThreads); without it thread 0 of warp 0 produces between
// its own steps, S - 2 slots ahead.
template <typename T, int BN, int SCALES, bool NESTED, bool SK, bool PW = false, bool SOLO = false, bool PREW = false,
          int STAGES = wg_stages(BN, SK, SCALES)>
__global__ void __launch_bounds__(kWgThreads<BN, PW>, wg_min_blocks(BN, PW, SK, SOLO))
    __maxnreg__(wg_max_regs(BN, PW, SK, SOLO))
    gemm4_wg_kernel(const GemmParams p, const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                    const int m_tiles, const int n_tiles, const WgSplit split) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WgCfg<BN, STAGES>;
  constexpr int S = C::kStages;
  constexpr bool UNIFORM = SCALES >= 1, PACK = SCALES == 2;
  constexpr int NS = UNIFORM ? 2 : 4;  // scales per lane and tile
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (mma::smem_addr(smem_raw) & 1023u)) & 1023u);
  // kWide: the lookups take the table's address as a constant (kHoles: and the layout has no room
  // to align); the host checked it (wg_wide_table_ok) before launching.
  if (C::kWide && mma::smem_addr(smem_raw) != kDynSmemBase) __trap();
  uint32_t* tab = reinterpret_cast<uint32_t*>(smem + C::kTabOff);
  float* code8 = reinterpret_cast<float*>(smem + C::kCode8Off);
  auto code8_index = [](uint32_t q) { return C::kHoles ? q + (q & 0xE0u) : q; };
  // full[s] (bar0 + 8 s): the tile in slot s landed (one arrival, the producer's, plus the copies'
  // bytes); empty[s] (bar0 + 8 (S + s)): all 8 warps are done with it (their wgmma group included).
  const uint32_t bar0 = mma::smem_addr(smem + C::kBarOff);
  auto full_bar = [&](int s) { return bar0 + 8u * s; };
  auto empty_bar = [&](int s) { return bar0 + 8u * (S + s); };
  // The pair table and the nested code are built by the consumers after the first copies are
  // issued (below, before the loop), so that the copies' latency covers them.
  float off = 0.0f;
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
  const uint32_t a_base = mma::smem_addr(smem) + C::kAOff, w_base = mma::smem_addr(smem) + C::kWOff;
  const uint32_t desc_lo0 = wg::desc_lo_k_sw128(a_base);  // slot 0's activation tile
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
  // with one batch tile, each W tile is read by one block only: evict_first in L2 (l2_read_policy)
  const uint64_t w_policy = l2_read_policy(p.w_evict_first != 0 && m_tiles == 1);
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
      wg::tma_load_2d(w_base + slot * C::kWStage, &w_map, p_kt * (C::kBK / 2), n0_of(pc.w), full_bar(slot), w_policy);
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
    for (int j = 0; j < NS; ++j) s2[j] = mma::splat2<T>(NESTED ? nested_absmax_value(code8[code8_index(q[j])], v[j], off) : v[j]);
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
      const float v = NESTED ? nested_absmax_value(code8[code8_index((gq[1][h] >> (8 * i)) & 0xFFu)], gv[1][h].x, off)
                             : (i == 0 ? gv[1][h].x : i == 1 ? gv[1][h].y : i == 2 ? gv[1][h].z : gv[1][h].w);
      s2[h] = mma::splat2<T>(v);
    }
  };

  // Decode: lane c takes byte c of each packed word from the pair table (kWide: wg_lookup, the table
  // at kDynSmemBase, asserted above; else lookup_sel).
  const uint32_t tab_base = mma::smem_addr(tab), lane8 = 8u * lane, sel = 0x5504u | (static_cast<uint32_t>(c) << 4);
  auto look = [&](uint32_t w) {
    if constexpr (C::kWide) return wg_lookup(lane8 >> 1, sel, w);
    else return lookup_sel(tab_base, lane8, sel, w);
  };
  const uint32_t w_rd = w_base + wrow * 32;
  auto load_words = [&](int slot, int h, int q, uint4& w) {  // the lane's packed words q of row half h
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                 : "r"(w_rd + slot * C::kWStage + 256 * h + 16 * q));
  };
  // k16 steps 2 half and 2 half + 1 into a[0], a[1], from the words q = half of both row halves.
  auto look_half = [&](uint32_t (*a)[4], const uint4& w0, const uint4& w1, int half) {
    const uint32_t sa = s2[UNIFORM ? 0 : half], sb = s2[UNIFORM ? 1 : 2 + half];
#pragma unroll
    for (int k2 = 0; k2 < 2; ++k2) {
      a[k2][0] = mma::mul2<T>(look(word(w0, 2 * k2)), sa);
      a[k2][1] = mma::mul2<T>(look(word(w1, 2 * k2)), sb);
      a[k2][2] = mma::mul2<T>(look(word(w0, 2 * k2 + 1)), sa);
      a[k2][3] = mma::mul2<T>(look(word(w1, 2 * k2 + 1)), sb);
    }
  };
  auto load_tile_words = [&](int slot, uint4 (&w)[2][2]) {  // all the lane's words of the slot's tile
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int q = 0; q < 2; ++q) load_words(slot, h, q, w[h][q]);
  };
  auto decode_words = [&](const uint4 (&w)[2][2], uint32_t (&a)[4][4]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) look_half(a + 2 * half, w[0][half], w[1][half], half);
  };
  auto decode = [&](int slot, uint32_t (&a)[4][4]) {  // all four k16 steps, the words loaded first
    uint4 w[2][2];
    load_tile_words(slot, w);
    decode_words(w, a);
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
  auto compute = [&](int slot, const uint32_t (&a)[4][4]) {
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wg::mma_rs<T, BN>(acc, a[kk], desc_lo0 + slot * (C::kAStage >> 4) + 2 * kk);
    wg::commit();
  };

  // HALVES (wg_halves): k16 steps 2 half .. 2 half + 1 of the slot's tile, from words q = half.
  auto decode_half = [&](int slot, uint32_t (&a)[2][4], int half) {
    uint4 w[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) load_words(slot, h, half, w[h]);
    look_half(a, w[0], w[1], half);
  };
  auto compute_half = [&](int slot, const uint32_t (&a)[2][4], int half) {
    wg::fence();
#pragma unroll
    for (int k2 = 0; k2 < 2; ++k2)
      wg::mma_rs<T, BN>(acc, a[k2], desc_lo0 + slot * (C::kAStage >> 4) + 2 * (2 * half + k2));
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

  constexpr bool PW_WG = PW && wg_producer_warpgroup(BN);  // registers to the consumers (kWgThreads)
  if constexpr (PW) {
    if (warp >= 8) {  // the producer: every iteration into slot j % S, once its last use is released
      if constexpr (PW_WG) wg::setmaxnreg_dec<40>();
      if (warp == 8 && lane == 0) {
        for (int jj = 0, slot = 0; jj < len; ++jj, slot = slot + 1 == S ? 0 : slot + 1) produce(jj, slot);
      }
      return;
    }
    if constexpr (PW_WG) wg::setmaxnreg_inc<232>();
  }
  uint32_t af0[4][4], af1[4][4];
  uint32_t hb[2][2][4];  // HALVES: the A registers of the two halves
  constexpr bool HALVES = wg_halves(BN, PW, SK, SOLO);
  static_assert(!PREW || (S >= 3 && !HALVES && wg_prew_ok(BN, PW, SCALES)), "PREW: see wg_prew_ok");
  uint4 wn[2][2];  // PREW: the words of the next iteration, loaded a step ahead
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
  // While the first tiles and scales are on their way: the table and the nested code, by the 8
  // consumer warps (the producer has left), then the consumers' barrier before any decode.
  mma::build_pair_table<T, C::kTabRowWords>(tab, p.code, tid, C::kThreads);
  if constexpr (C::kHoles) {
    if constexpr (NESTED) {
      for (int i = tid; i < 256; i += C::kThreads) code8[code8_index(i)] = p.absmax.nested_code[i];
      off = __ldg(p.absmax.offset);
    }
  } else {
    off = stage_nested(p.absmax, code8, tid, C::kThreads);
  }
  consumers_sync();
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
    if constexpr (!PREW) {
      wg::mbar_wait(full_bar(rd_slot), (phases >> rd_slot) & 1u);  // iteration j landed
      phases ^= 1u << rd_slot;
    }
    if constexpr (HALVES) {
      decode_half(rd_slot, hb[0], 0);  // hb[0] is free: the last wait left only j - 1's second half
      compute_half(rd_slot, hb[0], 0);
      wg::wait<1>();  // j - 1's second half done: hb[1] is free and the warp is done with j - 1's slot
      if (j > 0 && lane == 0) wg::mbar_arrive(empty_bar(prev_slot));
      decode_half(rd_slot, hb[1], 1);
      compute_half(rd_slot, hb[1], 1);
      wg::wait<1>();  // this first half done: hb[0] is free for iteration j + 1
    } else if constexpr (PREW) {
      decode_words(wn, af);  // iteration j's words, loaded during step j - 1 (or before the loop)
      compute(rd_slot, af);
      const int nx = rd_slot + 1 == S ? 0 : rd_slot + 1;
      if (j + 1 < len) {  // iteration j + 1's words, while group j - 1 finishes
        wg::mbar_wait(full_bar(nx), (phases >> nx) & 1u);
        phases ^= 1u << nx;
        load_tile_words(nx, wn);
      }
      wg::wait<1>();  // group j - 1 done: its A registers are free and the warp is done with its slot
      if (j > 0 && lane == 0) wg::mbar_arrive(empty_bar(prev_slot));
    } else {
      decode(rd_slot, af);
      compute(rd_slot, af);
      wg::wait<1>();  // group j - 1 done: its A registers are free and the warp is done with its slot
      if (j > 0 && lane == 0) wg::mbar_arrive(empty_bar(prev_slot));
    }
    prev_slot = rd_slot;
    rd_slot = rd_slot + 1 == S ? 0 : rd_slot + 1;
    wr_slot = wr_slot + 1 == S ? 0 : wr_slot + 1;
  };
  static_assert(LA == 4, "the loop below is unrolled for 4 scale sets");
  // SK: shares and tiles start at multiples of 4 k tiles, so segments end only between groups of 4.
  if constexpr (PREW) {
    if (len > 0) {  // iteration 0's words
      wg::mbar_wait(full_bar(0), 0u);
      phases ^= 1u;
      load_tile_words(0, wn);
    }
  }
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

// 2-D TMA descriptors (cuTensorMapEncodeTiled, from the driver through the runtime: no -lcuda):
// activations A [M, K] of T in boxes of box_rows x 64 k with the 128-byte swizzle; packed W [N, K / 2]
// bytes in boxes of 128 rows x 32 bytes. Zeros out of bounds.
inline CUtensorMap tensor_map_2d(const void* base, CUtensorMapDataType type, uint64_t inner, uint64_t rows, uint64_t row_bytes,
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

inline int64_t wg_tile_n(int64_t M) { return M <= 32 ? 32 : M <= 64 ? 64 : M <= 128 ? 128 : 256; }  // the batch tile by batch
inline int64_t wg_tiles(int64_t M, int64_t N) { return ceil_div(N, 128) * ceil_div(M, wg_tile_n(M)); }
// Stream-K where it measured faster (H200, benchmarks/results/h200/wgsk_probe.log and the seventh
// session's bench runs): only where whole tiles would keep fewer than half the SMs busy (shapes that
// went to dequantize + cuBLAS before: N = 4096, 32-64 tiles), with shares of at least 15 k tiles
// (BN 64, 128) or 48 (BN 256): 14336x4096 at batch 64/128/256/512 0.044/0.052/0.070/0.116 ms vs
// 0.085/0.086/0.095/0.128 for dequantize + cuBLAS, the same in three runs. 4096x4096 (shares of
// 15.5 k tiles at batch tile 128) measured 0.024, 0.030 and 0.036 ms at batch 64 in three runs of
// the seventh session, too unsteady to choose; the fifteenth session's A/B (H200, 7 interleaved
// rounds, spread 1-3%, h200/experiments/ab_paths_sk_4096_run3.log) took it there at batch 65..128:
// 65 / 96 / 128 0.0250 / 0.0249 / 0.0260 ms vs 0.0267 / 0.0305 / 0.0296 for dequantize + cuBLAS
// (cuBLAS fp16 0.019-0.022). At batch 129..256 (batch tile 256, shares of 48 needed) it keeps
// dequantize + cuBLAS: stream-K was level or slower there (256: 0.0363 vs 0.0314 ms). With
// more tiles stream-K was no faster (8192x28672 at batch 128: 0.155 vs 0.157 ms) or slower (at 64:
// 0.126 vs 0.106 ms; 4096x14336, 112 tiles, at 64-512), a loss per k tile not understood yet.
// tiles of batch tile bn, KT 64-wide k tiles.
inline bool wg_stream_k_pays(int64_t tiles, int64_t KT, int64_t bn, int64_t sms) {
  return KT % 4 == 0 && tiles * 2 < sms && tiles * KT >= sms * (bn == 256 ? 48 : 15);
}
// DP + SK (whole tiles for the full waves, stream-K over the last partial one) where it measured
// faster (H200, eighth session, benchmarks/results/h200/experiments/): batch tile 256, long rows (KT
// >= 128), more than one wave of tiles (up to four at batch tile 128), not a whole number of them. 8192x28672 (224 / 448
// tiles at batch 256 / 512), wg vs wgdp, ms: run 1 (one after the other) 0.2386 vs 0.2215 and 0.4543
// vs 0.4199; run 3 (median of 7 interleaved rounds) 0.2375 vs 0.2211 and 0.5113 vs 0.4295. Not at
// batch 1024 (896 tiles: run 1 0.8852 vs 0.8592, but run 2 0.72 vs 0.80-0.83 and run 3 0.8731 vs
// 0.9100; H100, ninth session, 5 interleaved rounds: 0.7664 vs 0.7941) while thread 0 produced; with
// the producer warpgroup (tenth session, H100) it is ahead: 0.7550 vs 0.7161 (5 rounds, run 2), and
// 0.6281 vs 0.5760 at 768 (672 tiles), 0.7953 vs 0.7697 at 1024 (9 rounds, run 3,
// h100/ab_paths_dp_sk_1024.log), so up to 8 waves at batch tile 256; at any number since the
// eleventh session (batch 2048, 1792 tiles: 1.5473 -> 1.5037 ms, h100/ab_paths_big_batch.log). Not with KT = 64 (4096x14336
// at 512: 0.1151 vs 0.1177: each split tile's fix-up weighs twice as much next to its work). Batch
// tile 128 too since the ninth session: 8192x28672 at 128 (224 tiles) gained a little in every
// measurement, 0.1576 -> 0.1561 ms (H200, eighth session), 0.1424 -> 0.1401 (H100, thread 0
// producing) and 0.1302 -> 0.1255 with the producer warp (h100/ab_paths_producer_warp.log).
inline bool wg_dp_stream_k_pays(int64_t tiles, int64_t KT, int64_t bn, int64_t sms) {
  return KT % 4 == 0 && bn >= 128 && KT >= 128 && tiles > sms && (bn == 256 || tiles < 4 * sms) && tiles % sms != 0;
}

// Shapes whose scales the warpgroup kernel loads packed (scale mode 2 in launch_wg, with its producer
// warp at every batch tile): blocksize 64 and whole groups of 4 k tiles. Without them it is slower at
// small batches, which the dispatch's wg_from_m reads.
inline bool wg_packed_scales_shape(int64_t blocksize, int64_t K) { return blocksize == 64 && K % 256 == 0; }

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
  // One instantiation, named by its tags; block size and shared memory follow from them.
  auto go = [&](auto scales_tag, auto nested_tag, auto sk_tag, auto pw_tag, auto solo_tag, auto prew_tag) {
    constexpr int SCALES = decltype(scales_tag)::value;
    constexpr bool NESTED = decltype(nested_tag)::value, SK = decltype(sk_tag)::value, PW = decltype(pw_tag)::value;
    constexpr int smem = WgCfg<BN, wg_stages(BN, SK, SCALES)>::kSmem;
    auto kernel = &gemm4_wg_kernel<T, BN, SCALES, NESTED, SK, PW, decltype(solo_tag)::value, decltype(prew_tag)::value>;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(grid), kWgThreads<BN, PW>, smem, stream>>>(
        p, a_map, w_map, static_cast<int>(m_tiles), static_cast<int>(n_tiles), split);
    NF4KIT_LAUNCH_CHECK();
  };
  const char* sc_env = std::getenv("NF4KIT_WG_SCALES");
  const bool pack = wg_packed_scales_shape(int64_t{1} << p.bs_shift, p.K) &&
                    (nested ? reinterpret_cast<uintptr_t>(p.absmax.absmax_u8) % 4 == 0
                            : reinterpret_cast<uintptr_t>(p.absmax.absmax_f32) % 16 == 0) &&
                    !(sc_env != nullptr && !std::strcmp(sc_env, "step"));
  // SOLO (wg_max_regs): at most one block an SM, so the producer-warp kernel at batch tiles 32 and 64
  // may take 112 registers instead of the 76-80 ptxas takes for two blocks. H200, eighteenth session,
  // 5 interleaved rounds (h200/experiments/ab_builds_maxnreg_run1.log), fp16, ms, 80 -> 112 registers
  // at batch tile 32: 4096x14336 (112 tiles) at 17 / 24 / 32 0.0287 / 0.0288 / 0.0286 -> 0.0270 /
  // 0.0270 / 0.0269; but 8192x28672 (224 tiles, two blocks on most SMs with 80) 0.0688 / 0.0687 /
  // 0.0687 -> 0.0785 / 0.0792 / 0.0793 when every block took 112 (one block an SM).
  const bool solo = grid <= sms;
  // The producer (PW, kWgThreads) at batch tiles 128 and 256 with the packed scales. H100, 5
  // interleaved rounds, thread 0 producing -> producer: batch tile 128 (ninth session) 8192x28672 at
  // batch 128 0.1424 -> 0.1302 ms, with DP + SK 0.1401 -> 0.1255; 4096x14336 at 96 / 128 0.0424 /
  // 0.0427 -> 0.0386 / 0.0388; 14336x4096 (stream-K) at 128 0.0503 -> 0.0465
  // (h100/ab_paths_producer_warp.log); batch tile 256 (tenth session) 8192x28672 at batch 256 / 512
  // / 1024 / 4096 0.2080 / 0.4322 / 0.7836 / 2.998 -> 0.1907 / 0.3762 / 0.7518 / 3.029
  // (h100/ab_paths_producer_wg.log). Batch tiles 32 and 64 (seventeenth session, H200, 7 interleaved
  // rounds, h200/experiments/ab_paths_producer_small_run3.log, thread 0 -> producer warp, fp16, ms):
  // at 32 8192x28672 at batch 24 / 32 0.0753 / 0.0760 -> 0.0691 / 0.0692, 4096x14336 0.0314 / 0.0321
  // -> 0.0280 / 0.0282; at 64 with stream-K 14336x4096 at 48 / 64 0.0388 / 0.0390 -> 0.0367 / 0.0369;
  // but at 64 one block per tile, while its wgmma was serialised, thread 0 kept producing (8192x28672
  // at 48 / 64 0.0838 / 0.0852 -> 0.0843 / 0.0860, 4096x14336 0.0348 / 0.0356 -> 0.0366 / 0.0366).
  // With HALVES (nineteenth session, H200, 5 interleaved rounds, h200/experiments/ab_paths_s19_run2.log,
  // thread 0 -> producer warp, fp16, ms) 8192x28672 at 33 / 48 / 64 0.0870 / 0.0839 / 0.0849 -> 0.0871 /
  // 0.0784 / 0.0801, 4096x14336 (SOLO) 0.0349 / 0.0349 / 0.0352 -> 0.0314 / 0.0320 / 0.0319, so the
  // producer is the default at every batch tile wherever the scales are packed (pack).
  // Development aid: NF4KIT_WG_PRODUCER=thread / warp forces either.
  const char* pw_env = std::getenv("NF4KIT_WG_PRODUCER");
  const bool pw_forced = pw_env != nullptr && *pw_env;
  const bool pw = pack && !(pw_forced && !std::strcmp(pw_env, "thread"));
  const char* prew_env = std::getenv("NF4KIT_WG_PREW");  // development aid: 1 / 0 forces PREW on / off
  const bool prew = prew_env != nullptr && *prew_env ? !std::strcmp(prew_env, "1") : mode == 2;
  using S2 = std::integral_constant<int, 2>;
  using S1 = std::integral_constant<int, 1>;
  using S0 = std::integral_constant<int, 0>;
  using F = std::false_type;
  using Tr = std::true_type;
  bool_switch(sk, [&](auto sk_tag) {
    bool_switch(nested, [&](auto nested_tag) {
      if (pw) {
        if constexpr (wg_two_blocks(BN, true, decltype(sk_tag)::value)) {
          if (solo) return go(S2{}, nested_tag, sk_tag, Tr{}, Tr{}, F{});
        }
        if constexpr (wg_prew_ok(BN, true, 2)) {
          if (prew) return go(S2{}, nested_tag, sk_tag, Tr{}, F{}, Tr{});
        }
        return go(S2{}, nested_tag, sk_tag, Tr{}, F{}, F{});
      }
      if (pack) go(S2{}, nested_tag, sk_tag, F{}, F{}, F{});
      else if (uniform) go(S1{}, nested_tag, sk_tag, F{}, F{}, F{});
      else go(S0{}, nested_tag, sk_tag, F{}, F{}, F{});
    });
  });
}

// Explicit instantiation (in gemm_4bit_wg<BN>.cu) and its extern declaration (in gemm_4bit.cu).
#define NF4KIT_WG_LAUNCH(PREFIX, BN)                                                         \
  PREFIX template void launch_wg<at::Half, BN>(const GemmParams&, bool, int, cudaStream_t); \
  PREFIX template void launch_wg<at::BFloat16, BN>(const GemmParams&, bool, int, cudaStream_t);
#define NF4KIT_WG_INSTANTIATE(BN) NF4KIT_WG_LAUNCH(, BN)
#define NF4KIT_WG_EXTERN(BN) NF4KIT_WG_LAUNCH(extern, BN)

}  // namespace gemm4
}  // namespace cuda
}  // namespace nf4kit
