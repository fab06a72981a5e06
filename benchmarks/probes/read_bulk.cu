// Standalone probe (no torch), nineteenth session: how fast do TMA bulk copies (cp.async.bulk,
// completing on an mbarrier) read an 8192 x 28672 packed 4-bit weight (117 MB), against the
// sequential LDG.128 read of read_pattern.cu (3.4 TB/s at this size, H200) and the skinny kernel's
// cp.async ring (3.0 TB/s)? A block is 8 consumer warps and one producer warp; a ring of STAGES
// slots of STAGE bytes with a full and an empty mbarrier each. The consumers read their 16-byte
// pieces of a slot back, spin SPIN cycles (a stand-in for the decode), and arrive on the slot's
// empty barrier (one arrival a warp); the producer refills it. SPIN is cycles a warp per 8 KB.
//  * seq: a persistent grid (B blocks an SM), each block one contiguous range, one bulk copy a slot;
//  * rows: the skinny kernel's pattern, a block owns ROWS rows and a slot holds STAGE / ROWS bytes
//    of each (ROWS bulk copies a slot, one a producer lane), one block per row tile.
// Median of 30, L2 flushed before each. Run 1 (nineteenth session, H200,
// benchmarks/results/h200/experiments/read_bulk_run1.txt): LDG.128 3.38 TB/s (470 MB: 3.82); bulk
// seq 3.04-3.08, bulk rows 2.23-3.03; with 1000 cycles a warp per 8 KB 1.70-2.80. No faster than
// the skinny kernel's cp.async ring, so not used.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/read_bulk benchmarks/probes/read_bulk.cu && /tmp/read_bulk
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>
#include "read_common.cuh"


// ROWS == 0: seq (persistent, contiguous ranges); else rows.
template <int ROWS, int STAGE, int STAGES>
__global__ void __launch_bounds__(288) bulk_ring(const uint8_t* __restrict__ w, int spin, unsigned* sink) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  const int tid = threadIdx.x, wp = tid >> 5, lane = tid & 31;
  // this block's bytes: [b0, b1) (seq) or rows [r0, r0 + ROWS) x all K (rows)
  int64_t b0, nst;
  if constexpr (ROWS == 0) {
    const int64_t per = (kBytes / gridDim.x + STAGE - 1) / STAGE * STAGE;
    b0 = per * blockIdx.x;
    const int64_t b1 = (b0 + per < kBytes ? b0 + per : kBytes);
    nst = b1 > b0 ? (b1 - b0 + STAGE - 1) / STAGE : 0;
  } else {
    b0 = static_cast<int64_t>(blockIdx.x) * ROWS * kRowBytes;
    nst = kRowBytes / (STAGE / ROWS);
  }
  if (tid < STAGES) {
    bar_init(sa(&full[tid]), 1);
    bar_init(sa(&empty[tid]), 8);
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  if (wp == 8) {  // producer
    for (int64_t s = 0; s < nst; ++s) {
      const int slot = static_cast<int>(s % STAGES);
      if (s >= STAGES) bar_wait(sa(&empty[slot]), static_cast<uint32_t>((s / STAGES - 1) & 1));
      if constexpr (ROWS == 0) {
        if (lane == 0) {
          const int64_t off = b0 + s * STAGE;
          const uint32_t n = static_cast<uint32_t>((kBytes - off < STAGE ? kBytes - off : STAGE));
          bar_expect(sa(&full[slot]), n);
          bulk(sa(smem + slot * STAGE), w + off, n, sa(&full[slot]));
        }
      } else {
        constexpr int PIECE = STAGE / ROWS;
        if (lane == 0) bar_expect(sa(&full[slot]), STAGE);
        __syncwarp();
        for (int r = lane; r < ROWS; r += 32)
          bulk(sa(smem + slot * STAGE + r * PIECE), w + b0 + r * kRowBytes + s * PIECE, PIECE, sa(&full[slot]));
      }
    }
    return;
  }
  unsigned acc = 0;
  for (int64_t s = 0; s < nst; ++s) {
    const int slot = static_cast<int>(s % STAGES);
    bar_wait(sa(&full[slot]), static_cast<uint32_t>((s / STAGES) & 1));
#pragma unroll
    for (int i = 0; i < STAGE / 16 / 256; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(smem + slot * STAGE + 16 * (tid + 256 * i));
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (spin > 0) {  // spin is cycles per 8 KB
      const long long t0 = clock64(), n = static_cast<long long>(spin) * STAGE / 8192;
      while (clock64() - t0 < n) acc += 1;
    }
    __syncwarp();
    if (lane == 0) bar_arrive(sa(&empty[slot]));
  }
  if (acc == 0x12345678u) *sink = acc;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("# benchmarks/probes/read_bulk.cu: %s, %d SMs; read 117 MB (8192x28672 packed); ms = median of 30, L2 flushed\n",
         prop.name, prop.multiProcessorCount);
  uint8_t* w; unsigned* sink;
  CK(cudaMalloc(&w, kBytes * 4));  // 4x for the large seq reference
  CK(cudaMalloc(&sink, 4));
  fill_weight(w, kBytes * 4);
  FlushTimer timer;
  auto timeit = [&](const char* name, int64_t bytes, auto&& launch) { timer.report(name, 62, bytes, launch); };
  const int sms = prop.multiProcessorCount;
  timeit("seq LDG.128 x4, grid 2 x SMs x 8 warps", kBytes,
         [&] { seq_read<4><<<sms * 2, 256>>>(reinterpret_cast<const uint4*>(w), kBytes / 16, sink); });
  timeit("seq LDG.128 x4, grid 2 x SMs x 8 warps, 470 MB", 4 * kBytes,
         [&] { seq_read<4><<<sms * 2, 256>>>(reinterpret_cast<const uint4*>(w), 4 * kBytes / 16, sink); });
  auto run = [&](auto ring, int per_sm, int spin) {  // ring: a Ring<STAGE, STAGES, ROWS>
    constexpr int rows = decltype(ring)::kRows, stage = decltype(ring)::kStage, stages = decltype(ring)::kStages;
    constexpr int smem = stage * stages;
    auto* k = &bulk_ring<rows, stage, stages>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int occ = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k, 288, smem));
    const unsigned grid = rows == 0 ? static_cast<unsigned>(sms * std::min(per_sm, occ)) : static_cast<unsigned>(kN / rows);
    char nm[128];
    if (rows == 0)
      snprintf(nm, sizeof nm, "bulk seq %2d KB x %d st, %d blk/SM, spin %d", stage / 1024, stages, grid / sms, spin);
    else
      snprintf(nm, sizeof nm, "bulk rows %2d x %4d B x %d st, %d blk/SM occ, spin %d", rows, stage / rows, stages, occ, spin);
    timeit(nm, kBytes, [&] { k<<<grid, 288, smem>>>(w, spin, sink); });
  };
  for (int spin : {0, 1000}) {
    run(Ring<8192, 4>{}, 3, spin);  // seq: per_sm blocks an SM (at most what fits)
    run(Ring<8192, 8>{}, 2, spin);
    run(Ring<16384, 4>{}, 2, spin);
    run(Ring<16384, 6>{}, 2, spin);
    run(Ring<32768, 4>{}, 1, spin);
    run(Ring<32768, 6>{}, 1, spin);
    run(Ring<8192, 4, 32>{}, 0, spin);  // rows: one block a row tile
    run(Ring<8192, 8, 32>{}, 0, spin);
    run(Ring<8192, 4, 16>{}, 0, spin);
    run(Ring<8192, 8, 16>{}, 0, spin);
    run(Ring<16384, 4, 32>{}, 0, spin);
    run(Ring<8192, 8, 8>{}, 0, spin);
  }
  timeit("seq LDG.128 x4, grid 2 x SMs x 8 warps (again)", kBytes,
         [&] { seq_read<4><<<sms * 2, 256>>>(reinterpret_cast<const uint4*>(w), kBytes / 16, sink); });
  return 0;
}
