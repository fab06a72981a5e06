// Shared by the read probes (read_pattern.cu, read_bulk.cu, l2_bulk.cu, l2_policy.cu): the CUDA error check and the plain
// sequential read (a grid-stride LDG.128 loop with U loads in flight a thread), the baseline both compare with.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <vector>
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e_), __LINE__); exit(1);} } while (0)

template <int U>
__global__ void __launch_bounds__(256) seq_read(const uint4* __restrict__ w, int64_t n16, unsigned* sink) {
  unsigned acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * 256;
  int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  for (; i + (U - 1) * stride < n16; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = __ldcs(w + i + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].w ^ (v[u].y + v[u].z);
  }
  for (; i < n16; i += stride) { const uint4 a = __ldcs(w + i); acc ^= a.x ^ a.w; }
  if (acc == 0x12345678u) *sink = acc;
}

// Median of 30 timed launches (after 3 untimed ones), with a 256 MB memset before each to flush L2.
struct FlushTimer {
  void* flush = nullptr;
  cudaEvent_t e0, e1;
  FlushTimer() {
    CK(cudaMalloc(&flush, 256 << 20));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
  }
  template <typename Launch>
  float median_ms(Launch&& launch) {
    std::vector<float> t;
    for (int i = 0; i < 33; ++i) {
      CK(cudaMemsetAsync(flush, i, 256 << 20));
      CK(cudaEventRecord(e0));
      launch();
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 3) t.push_back(ms);
    }
    CK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
  // One line: name padded to width, the median and the rate for bytes read.
  template <typename Launch>
  void report(const char* name, int width, double bytes, Launch&& launch) {
    const float ms = median_ms(launch);
    printf("%-*s %8.4f ms %8.1f GB/s\n", width, name, ms, bytes / (ms * 1e-3) / 1e9);
  }
};

// A ring's shape as a type, so that one value names both the kernel's template arguments and the
// host's sizes: STAGES slots of STAGE bytes (ROWS: read_bulk.cu's row pattern, 0 = sequential).
template <int STAGE, int STAGES, int ROWS = 0>
struct Ring {
  static constexpr int kStage = STAGE, kStages = STAGES, kRows = ROWS;
};

// The TMA probes' mbarrier ring (read_bulk.cu, l2_bulk.cu): shared addresses, init / wait / arrive /
// expect_tx, and a bulk copy that completes on a barrier.
__device__ __forceinline__ uint32_t sa(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void bar_init(uint32_t b, int n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(b), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t b, uint32_t parity) {
  uint32_t ok = 0;
  while (!ok)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\n"
                 : "=r"(ok) : "r"(b), "r"(parity) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint32_t b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(b) : "memory");
}
__device__ __forceinline__ void bar_expect(uint32_t b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk(uint32_t dst, const void* src, uint32_t bytes, uint32_t b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(b) : "memory");
}
