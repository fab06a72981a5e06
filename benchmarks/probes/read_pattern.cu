// Standalone probe (no torch): how fast can the skinny kernel's memory pattern read an
// 8192 x 28672 packed 4-bit weight (117 MB) with no decode at all? tile_ring (read_common.cuh): a block owns ROWS rows of W and
// walks K in stages of ROWS x CHUNK bytes (8 KB), copied by cp.async (16 bytes per thread) into a
// STAGES-deep ring; each stage: wait, block barrier, issue the stage STAGES - 1 ahead, read one
// 16-byte word back (and, with SPIN, burn that many cycles per warp as a stand-in for the decode).
// Dynamic shared memory is padded to the skinny kernel's 66.5 KB (3 blocks per SM) or as given.
// Beside it: a read-only grid-stride LDG.128 kernel (4 or 8 loads in flight a thread). And the ring
// without the block barrier (twelfth session; run in the thirteenth: slower than the barrier ring): a full mbarrier per slot that the
// copies arrive on (cp.async.mbarrier.arrive), and the last warp to finish a slot (a shared
// counter) refills it, so no warp waits for the slowest one but when the data is not there; with
// L2HINT the copies carry .L2::256B. Median of 30, L2 flushed before each.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/read_pattern benchmarks/probes/read_pattern.cu && /tmp/read_pattern [rows]
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>
#include "read_common.cuh"  // tile_ring: the barrier ring

// The ring without a block barrier (see the top). 8 warps consume every stage (each its 16 bytes
// a thread, as tile_ring); slot s % STAGES is refilled with stage s + STAGES by the last warp to
// finish it, 16 copies a lane, then each lane's cp.async.mbarrier.arrive.noinc on the slot's full
// barrier (32 arrivals a phase).
__device__ __forceinline__ void cp16_hint(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
template <int ROWS, int STAGES, bool L2HINT>
__global__ void __launch_bounds__(256) mbar_ring(const uint8_t* __restrict__ w, int spin, unsigned* sink) {
  constexpr int CHUNK = kStageBytes / ROWS, CPR = CHUNK / 16;  // bytes / 16-byte chunks of a row a stage
  constexpr int NST = kRowBytes / CHUNK;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t full[STAGES];
  __shared__ int done[STAGES];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int tid = threadIdx.x, lane = tid & 31;
  const uint8_t* rows = w + static_cast<int64_t>(blockIdx.x) * ROWS * kRowBytes;
  auto fill = [&](int stage) {  // one warp: the whole stage, 16 chunks a lane, then its arrival
    const int slot = stage % STAGES;
    if (stage < NST) {
#pragma unroll
      for (int i = 0; i < kStageBytes / 16 / 32; ++i) {
        const int id = lane + 32 * i, row = id / CPR, q = id % CPR;
        const uint8_t* src = rows + static_cast<int64_t>(row) * kRowBytes + static_cast<int64_t>(stage) * CHUNK + 16 * q;
        if (L2HINT) cp16_hint(base + slot * kStageBytes + 16 * id, src);
        else cp16(base + slot * kStageBytes + 16 * id, src);
      }
    }
    const uint32_t fb = static_cast<uint32_t>(__cvta_generic_to_shared(&full[slot]));
    asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(fb) : "memory");
  };
  if (tid < STAGES) {
    const uint32_t fb = static_cast<uint32_t>(__cvta_generic_to_shared(&full[tid]));
    asm volatile("mbarrier.init.shared.b64 [%0], 32;\n" ::"r"(fb) : "memory");
    done[tid] = 0;
  }
  __syncthreads();
  if (tid < 32)
    for (int s = 0; s < STAGES; ++s) fill(s);
  unsigned acc = 0;
  for (int s = 0; s < NST; ++s) {
    const int slot = s % STAGES;
    const uint32_t fb = static_cast<uint32_t>(__cvta_generic_to_shared(&full[slot]));
    const uint32_t parity = (s / STAGES) & 1;
    uint32_t ok = 0;
    while (!ok)
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\n"
                   : "=r"(ok) : "r"(fb), "r"(parity) : "memory");
    const uint4 v = *reinterpret_cast<const uint4*>(smem + slot * kStageBytes + 16 * tid);  // after the wait (memory clobber)
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
    if (spin > 0) {
      const long long t0 = clock64();
      while (clock64() - t0 < spin) acc += 1;
    }
    __syncwarp();
    int last = 0;
    if (lane == 0) {
      __threadfence_block();
      last = atomicAdd(&done[slot], 1) == 7;
      if (last) done[slot] = 0;
      __threadfence_block();
    }
    if (__shfl_sync(0xffffffffu, last, 0)) fill(s + STAGES);
  }
  if (acc == 0x12345678u) *sink = acc;
}


// The direct kernel's pattern (thirteenth session, benchmarks/probes/skinny_direct.patch): no
// shared memory; a block owns BR = 2 x 512 / PIECE rows and its 8 warps take turns over each row's
// 4 KB in steps of PIECE bytes; in a step each lane loads 16 bytes of row lane / (PIECE / 16) and of
// the row BR / 2 below (two LDG.128: 1 KB a warp step), D steps ahead in registers, then SPIN cycles.
// PIECE 64 is the direct kernel's (8 rows x 64 bytes a warp load); 512 is one row's contiguous 512.
template <int PIECE, int D>
__global__ void __launch_bounds__(256) rows_read(const uint8_t* __restrict__ w, int spin, unsigned* sink) {
  constexpr int LPR = PIECE / 16, BR = 2 * 32 / LPR, NS = kRowBytes / PIECE;
  const int tid = threadIdx.x, wp = tid >> 5, lane = tid & 31;
  const uint8_t* r0 = w + (static_cast<int64_t>(blockIdx.x) * BR + lane / LPR) * kRowBytes + 16 * (lane % LPR);
  const uint8_t* r1 = r0 + static_cast<int64_t>(BR / 2) * kRowBytes;
  const int jn = wp < NS ? (NS - wp + 7) / 8 : 0;
  uint4 b0[D], b1[D];
  auto load = [&](int d, int j) {
    if (j < jn) {
      const int64_t off = static_cast<int64_t>(wp + 8 * j) * PIECE;
      b0[d] = __ldg(reinterpret_cast<const uint4*>(r0 + off));
      b1[d] = __ldg(reinterpret_cast<const uint4*>(r1 + off));
    }
  };
#pragma unroll
  for (int d = 0; d < D; ++d) load(d, d);
  unsigned acc = 0;
  for (int j0 = 0; j0 < jn; j0 += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (j0 + d >= jn) break;
      const uint4 x = b0[d], y = b1[d];
      load(d, j0 + d + D);
      acc ^= x.x ^ x.y ^ x.z ^ x.w ^ y.x ^ y.y ^ y.z ^ y.w;
      if (spin) {
        const long long t0 = clock64();
        while (clock64() - t0 < spin) {
        }
      }
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("# benchmarks/probes/read_pattern.cu: %s, %d SMs; read 117 MB (8192x28672 packed); ms = median of 30, L2 flushed\n",
         prop.name, prop.multiProcessorCount);
  uint8_t* w; unsigned* sink;
  CK(cudaMalloc(&w, kBytes));
  CK(cudaMalloc(&sink, 4));
  fill_weight(w);
  FlushTimer timer;
  auto timeit = [&](const char* name, auto&& launch) { timer.report(name, 58, kBytes, launch); };
  const int sms = prop.multiProcessorCount;
  // argv[1] == "rows": only the direct kernel's pattern (rows_read), against seq_read
  auto rows_any = [&](auto piece_tag, auto d_tag, int spin) {
    constexpr int PIECE = decltype(piece_tag)::value, D = decltype(d_tag)::value;
    auto* k = &rows_read<PIECE, D>;
    constexpr int BR = 2 * 32 / (PIECE / 16);
    char nm[128];
    snprintf(nm, sizeof nm, "rows_read %3d B pieces (%2d rows a block), D %d, spin %d", PIECE, BR, D, spin);
    timeit(nm, [&] { k<<<static_cast<unsigned>(kN / BR), 256>>>(w, spin, sink); });
  };
  if (argc > 1 && std::string(argv[1]) == "rows") {
    timeit("seq LDG.128 x4, grid 2 x SMs x 8 warps", [&] { seq_read<4><<<sms * 2, 256>>>(reinterpret_cast<const uint4*>(w), kBytes / 16, sink); });
    using P64 = std::integral_constant<int, 64>;
    using P128 = std::integral_constant<int, 128>;
    using P256 = std::integral_constant<int, 256>;
    using P512 = std::integral_constant<int, 512>;
    using D2 = std::integral_constant<int, 2>;
    using D4 = std::integral_constant<int, 4>;
    for (int spin : {0, 500}) {
      rows_any(P64{}, D2{}, spin);
      rows_any(P64{}, D4{}, spin);
      rows_any(P128{}, D2{}, spin);
      rows_any(P128{}, D4{}, spin);
      rows_any(P256{}, D2{}, spin);
      rows_any(P512{}, D2{}, spin);
    }
    return 0;
  }
  for (int g : {1, 2, 4, 8}) {
    char nm[96];
    snprintf(nm, sizeof nm, "seq LDG.128 x4, grid %d x SMs x 8 warps", g);
    timeit(nm, [&] { seq_read<4><<<sms * g, 256>>>(reinterpret_cast<const uint4*>(w), kBytes / 16, sink); });
    snprintf(nm, sizeof nm, "seq LDG.128 x8, grid %d x SMs x 8 warps", g);
    timeit(nm, [&] { seq_read<8><<<sms * g, 256>>>(reinterpret_cast<const uint4*>(w), kBytes / 16, sink); });
  }
  // One ring kernel k (ROWS rows a block) at smem bytes of dynamic shared memory; label: its name
  // up to the occupancy and spin, which this adds.
  auto run_ring = [&](auto* k, int rows, int smem, int spin, const char* label) {
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int occ = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k, 256, smem));
    char nm[128];
    snprintf(nm, sizeof nm, "%s, %d blk/SM, spin %d", label, occ, spin);
    timeit(nm, [&] { k<<<static_cast<unsigned>(kN / rows), 256, smem>>>(w, spin, sink); });
  };
  // tile_ring (flag: PAIR) or, with mb, mbar_ring (flag: L2HINT)
  auto ring_any = [&](bool mb, auto rows_tag, auto stages_tag, int smem, int spin, auto flag_tag) {
    constexpr int ROWS = decltype(rows_tag)::value, STAGES = decltype(stages_tag)::value;
    constexpr bool FLAG = decltype(flag_tag)::value;
    char label[96];
    snprintf(label, sizeof label, "%s %2d rows x %4d B%s, %d st", mb ? "mbar ring" : "ring", ROWS, kStageBytes / ROWS,
             FLAG ? (mb ? " L2::256B" : " paired") : "", STAGES);
    if (mb) run_ring(&mbar_ring<ROWS, STAGES, FLAG>, ROWS, smem, spin, label);
    else run_ring(&tile_ring<ROWS, STAGES, FLAG>, ROWS, smem, spin, label);
  };
  auto ring = [&](auto... a) { ring_any(false, a...); };
  auto mring = [&](auto... a) { ring_any(true, a...); };
  using F = std::false_type;
  using P = std::true_type;
  using R32 = std::integral_constant<int, 32>;
  using R16 = std::integral_constant<int, 16>;
  using R8 = std::integral_constant<int, 8>;
  using S4 = std::integral_constant<int, 4>;
  using S8 = std::integral_constant<int, 8>;
  const int skinny_smem = 66560 + 1024 + 2 * 32 * 33 * 4;
  for (int spin : {0, 1000, 1500, 2000}) {
    ring(R32{}, S4{}, skinny_smem, spin, F{});
    ring(R32{}, S4{}, skinny_smem, spin, P{});
    ring(R16{}, S4{}, skinny_smem, spin, F{});
    ring(R16{}, S4{}, skinny_smem, spin, P{});
    ring(R8{}, S4{}, skinny_smem, spin, F{});
  }
  ring(R32{}, S8{}, 8 * kStageBytes, 1000, F{});
  ring(R16{}, S8{}, 8 * kStageBytes, 1000, F{});
  for (int spin : {0, 1000, 1500}) {
    mring(R32{}, S4{}, skinny_smem, spin, F{});
    mring(R32{}, S4{}, skinny_smem, spin, P{});
    mring(R16{}, S4{}, skinny_smem, spin, F{});
    mring(R32{}, S8{}, 8 * kStageBytes, spin, F{});
  }
  ring(R32{}, S4{}, skinny_smem, 0, F{});  // tile_ring again at the end: the card's drift over the run
  return 0;
}
