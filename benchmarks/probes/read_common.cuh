// Shared by the read probes (read_pattern.cu, read_bulk.cu, l2_bulk.cu, l2_policy.cu, read_sizes.cu): the CUDA error check and the plain
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

// The 8192 x 28672 packed 4-bit weight the read probes read (117 MB), and the skinny kernel's 8 KB
// stage.
constexpr int64_t kN = 28672, kK = 8192, kRowBytes = kK / 2, kBytes = kN * kRowBytes;
constexpr int kStageBytes = 8192;

// bytes (the weight's kBytes unless given) on the device, filled with pseudo-random bytes (never
// zeros).
inline void fill_weight(uint8_t* w, int64_t bytes = kBytes) {
  std::vector<uint8_t> h(bytes);
  uint32_t x = 12345;
  for (auto& b : h) { x = x * 1664525u + 1013904223u; b = static_cast<uint8_t>(x >> 24); }
  CK(cudaMemcpy(w, h.data(), h.size(), cudaMemcpyHostToDevice));
}

// Reads n16 16-byte words (a clean L2 afterwards: FlushTimer with dirty = false).
__global__ void read_all(const uint4* __restrict__ f, int64_t n16, unsigned* sink) {
  unsigned acc = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc ^= f[i].x;
  if (acc == 0x12345678u) *sink = acc;
}

// Median of 30 timed launches (after 3 untimed ones), with L2 flushed before each: by a 256 MB
// memset (dirty = true, as triton's do_bench: L2 left full of dirty lines) or by reading 256 MB
// (clean lines).
struct FlushTimer {
  void* flush = nullptr;
  unsigned* sink = nullptr;
  int sms = 0;
  cudaEvent_t e0, e1;
  FlushTimer() {
    CK(cudaMalloc(&flush, 256 << 20));
    CK(cudaMemset(flush, 1, 256 << 20));
    CK(cudaMalloc(&sink, 4));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
  }
  template <typename Launch>
  float median_ms(Launch&& launch, bool dirty = true) {
    std::vector<float> t;
    for (int i = 0; i < 33; ++i) {
      if (dirty) CK(cudaMemsetAsync(flush, i, 256 << 20));
      else read_all<<<sms * 4, 256>>>(static_cast<const uint4*>(flush), (256 << 20) / 16, sink);
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

// cp.async of 16 bytes (plain, or with an L2 cache policy from evict_first_policy), its groups.
__device__ __forceinline__ void cp16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp16_policy(uint32_t dst, const void* src, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "l"(pol) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait_groups() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}

// The sequential read with 4 loads in flight a thread by ld.global.nc, plain or (EF) with an
// evict_first L2 policy (l2_policy.cu, read_sizes.cu).
template <bool EF>
__device__ __forceinline__ uint4 ld16(const uint4* p, uint64_t pol) {
  uint4 v;
  if (EF)
    asm volatile("ld.global.nc.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(pol));
  else
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <bool EF>
__global__ void __launch_bounds__(256) seq_policy(const uint4* __restrict__ w, int64_t n16, unsigned* sink) {
  const uint64_t pol = evict_first_policy();
  unsigned acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * 256;
  int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = ld16<EF>(w + i + u * stride, pol);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].w ^ (v[u].y + v[u].z);
  }
  for (; i < n16; i += stride) { const uint4 a = ld16<EF>(w + i, pol); acc ^= a.x ^ a.w; }
  if (acc == 0x12345678u) *sink = acc;
}

// The skinny kernel's copy pattern with no decode: a block owns ROWS rows of the weight and walks K
// in stages of ROWS x CHUNK bytes (8 KB), copied by cp.async (16 bytes per thread) into a
// STAGES-deep ring; each stage: wait, block barrier, issue the stage STAGES - 1 ahead, read one
// 16-byte word back (and, with spin, burn that many cycles per warp as a stand-in for the decode).
// PAIR: two stages per issue at even stages. EF: the copies carry an evict_first L2 policy.
template <int ROWS, int STAGES, bool PAIR = false, bool EF = false>
__global__ void __launch_bounds__(256) tile_ring(const uint8_t* __restrict__ w, int spin, unsigned* sink) {
  constexpr int CHUNK = kStageBytes / ROWS;       // bytes of each row per stage
  constexpr int PER = kStageBytes / 16 / 256;     // 16-byte copies per thread per stage
  constexpr int NST = kRowBytes / CHUNK;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int tid = threadIdx.x;
  const uint64_t pol = EF ? evict_first_policy() : 0;
  const uint8_t* src[PER];
  uint32_t dst[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int id = tid + 256 * i, row = id / (CHUNK / 16), q = id % (CHUNK / 16);
    src[i] = w + (static_cast<int64_t>(blockIdx.x) * ROWS + row) * kRowBytes + 16 * q;
    dst[i] = base + 16 * id;
  }
  int issued = 0;
  auto issue = [&]() {
    if (issued < NST) {
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        if (EF) cp16_policy(dst[i] + (issued % STAGES) * kStageBytes, src[i] + issued * CHUNK, pol);
        else cp16(dst[i] + (issued % STAGES) * kStageBytes, src[i] + issued * CHUNK);
      }
    }
    commit();
    ++issued;
  };
  unsigned acc = 0;
  if constexpr (PAIR) {  // two stages per issue at even stages: 2 x CHUNK contiguous bytes of each row
    issue(); issue();
  } else {
    for (int s = 0; s < STAGES - 1; ++s) issue();
  }
  for (int s = 0; s < NST; ++s) {
    if constexpr (PAIR) {
      // even s: stages s, s + 1 in flight (two groups); odd s: s only
      if (s & 1) wait_groups<0>(); else wait_groups<1>();
      __syncthreads();
      if (!(s & 1)) { issue(); issue(); }
    } else {
      wait_groups<STAGES - 2>();
      __syncthreads();
      issue();
    }
    const uint4 v = *reinterpret_cast<const uint4*>(smem + (s % STAGES) * kStageBytes + 16 * tid);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
    if (spin > 0) {
      const long long t0 = clock64();
      while (clock64() - t0 < spin) acc += 1;
    }
  }
  if (acc == 0x12345678u) *sink = acc;
}

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
