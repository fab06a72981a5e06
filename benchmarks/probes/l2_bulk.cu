// Standalone probe (no torch), twentieth session: how fast can all SMs read data that sits in L2?
// The warpgroup kernel re-reads the activation tile of every (tile, k tile) from L2: at batch 128 on
// 8192x28672 that is 470 MB of activation reads next to the 117 MB weight (573 MB in 0.123 ms, 4.6
// TB/s L2 -> SM), at batch 256 and 1024 (batch tile 256) ~5.3 TB/s. If this card's L2 -> SM ceiling
// is near that, those rows are bound by L2 bandwidth and multicasting the activation tile to a
// cluster of blocks (each L2 read feeding two SMs) is the lever.
// A persistent grid (B blocks an SM) of 8 consumer warps and one producer warp reads TOTAL bytes in
// STAGE-byte cp.async.bulk copies into a ring, cycling through a SMALL-byte buffer (L2-resident;
// each block starts at its own offset). Also LDG.128 over the same small buffer, repeated. Median of
// 30 launches. Run 1 (twentieth session, H200, benchmarks/results/h200/experiments/l2_bulk_run1.txt):
// bulk 8.0-9.2 TB/s (32 KB copies fastest), LDG.128 7.8-8.6 TB/s, from 4 or 16 MB alike; so the
// warpgroup kernel's ~5.3 TB/s of L2 reads at batch 256 / 1024 is ~60% of this ceiling (~75% if it
// scales with the ~1500 MHz those rows run at, power_clock.py): near it, not at it.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/l2_bulk benchmarks/probes/l2_bulk.cu && /tmp/l2_bulk
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#include "read_common.cuh"

template <int STAGE, int STAGES>
__global__ void __launch_bounds__(288) l2_ring(const uint8_t* __restrict__ buf, int64_t small, int64_t nst, unsigned* sink) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  const int tid = threadIdx.x, wp = tid >> 5, lane = tid & 31;
  if (tid < STAGES) {
    bar_init(sa(&full[tid]), 1);
    bar_init(sa(&empty[tid]), 8);
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  const int64_t chunks = small / STAGE, first = (static_cast<int64_t>(blockIdx.x) * 7919) % chunks;
  if (wp == 8) {
    if (lane == 0) {
      for (int64_t s = 0; s < nst; ++s) {
        const int slot = static_cast<int>(s % STAGES);
        if (s >= STAGES) bar_wait(sa(&empty[slot]), static_cast<uint32_t>((s / STAGES - 1) & 1));
        bar_expect(sa(&full[slot]), STAGE);
        bulk(sa(smem + slot * STAGE), buf + ((first + s) % chunks) * STAGE, STAGE, sa(&full[slot]));
      }
    }
    return;
  }
  unsigned acc = 0;
  for (int64_t s = 0; s < nst; ++s) {
    const int slot = static_cast<int>(s % STAGES);
    bar_wait(sa(&full[slot]), static_cast<uint32_t>((s / STAGES) & 1));
    const uint4 v = *reinterpret_cast<const uint4*>(smem + slot * STAGE + 16 * tid);  // touch the slot
    acc ^= v.x ^ v.w;
    __syncwarp();
    if (lane == 0) bar_arrive(sa(&empty[slot]));
  }
  if (acc == 0x12345678u) *sink = acc;
}

// LDG.128 over the small buffer (n16 a power of two), `reps` passes of `per` loads a thread (each
// block starts at its own place).
__global__ void __launch_bounds__(256) l2_ldg(const uint4* __restrict__ buf, int64_t n16, int per, int reps, unsigned* sink) {
  unsigned acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * 256, mask = n16 - 1;
  for (int r = 0; r < reps; ++r) {
    const int64_t i = static_cast<int64_t>(blockIdx.x + r * 17) * 256 + threadIdx.x;
    for (int k = 0; k < per; k += 4) {
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = __ldcg(buf + ((i + (k + u) * stride) & mask));
#pragma unroll
      for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].w ^ (v[u].y + v[u].z);
    }
  }
  if (acc == 0x12345678u) *sink = acc;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  printf("# benchmarks/probes/l2_bulk.cu: %s, %d SMs, L2 %d MB; reads of an L2-resident buffer; median of 30\n", prop.name,
         sms, prop.l2CacheSize >> 20);
  uint8_t* buf; unsigned* sink;
  const int64_t kMax = 32ll << 20;
  CK(cudaMalloc(&buf, kMax));
  CK(cudaMemset(buf, 0x5a, kMax));
  CK(cudaMalloc(&sink, 4));
  FlushTimer timer;
  const int64_t total = 2ll << 30;  // bytes read by the whole grid
  auto run = [&](auto ring, int per_sm, int64_t small) {  // ring: a Ring<STAGE, STAGES>
    constexpr int stage = decltype(ring)::kStage, stages = decltype(ring)::kStages, smem = stage * stages;
    auto* k = &l2_ring<stage, stages>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int grid = sms * per_sm;
    const int64_t nst = total / stage / grid;
    char nm[128];
    snprintf(nm, sizeof nm, "bulk %2d KB x %d st, %d blk/SM, from %2lld MB", stage / 1024, stages, per_sm,
             static_cast<long long>(small >> 20));
    timer.report(nm, 56, static_cast<double>(nst) * stage * grid, [&] { k<<<grid, 288, smem>>>(buf, small, nst, sink); });
  };
  for (int64_t small : {4ll << 20, 16ll << 20}) {
    run(Ring<16384, 4>{}, 1, small);
    run(Ring<16384, 8>{}, 1, small);
    run(Ring<32768, 4>{}, 1, small);
    run(Ring<32768, 6>{}, 1, small);
    run(Ring<16384, 6>{}, 2, small);
    run(Ring<8192, 8>{}, 2, small);
    {
      const int64_t n16 = small / 16, grid = 2ll * sms;
      const int per = static_cast<int>((n16 / (grid * 256) + 3) / 4 * 4), reps = 64;
      char nm[96];
      snprintf(nm, sizeof nm, "LDG.128 x4, 2 blk/SM x 8 warps, from %2lld MB", static_cast<long long>(small >> 20));
      timer.report(nm, 56, static_cast<double>(per) * reps * grid * 256 * 16,
                   [&] { l2_ldg<<<static_cast<unsigned>(grid), 256>>>(reinterpret_cast<const uint4*>(buf), n16, per, reps, sink); });
    }
  }
  return 0;
}
