// Standalone probe (no torch), twenty-second session: does the L2 eviction policy of a streaming
// read change its speed after the benchmark's L2 flush? triton's do_bench (and FlushTimer) flush L2
// by writing a 256 MB buffer, so the read that follows finds L2 full of dirty lines; every line it
// brings in with the default (evict_normal) policy can push one of them out to DRAM, a write inside
// the timed read. A read whose lines are evict_first replaces its own clean lines instead.
// Reads the 117 MB packed 8192 x 28672 weight two ways, each plain and with evict_first:
//  * seq: grid-stride LDG.128, 4 loads in flight a thread (plain: ld.global.nc; ef: ld.global.nc.L2::cache_hint);
//  * ring: the skinny kernel's pattern, 32 rows a block, 8 KB stages by cp.async.cg into a 4-stage ring
//    (plain, or .L2::cache_hint with an evict_first policy), padded to 3 blocks an SM;
// after a write flush (memset of 256 MB: dirty L2, as do_bench) and after a read flush (a kernel
// reading 256 MB: clean L2). Median of 30.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/l2_policy benchmarks/probes/l2_policy.cu && /tmp/l2_policy
#include <functional>
#include "read_common.cuh"

constexpr int64_t kN = 28672, kK = 8192, kRowBytes = kK / 2, kBytes = kN * kRowBytes;
constexpr int kStageBytes = 8192;

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
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
__global__ void __launch_bounds__(256) seq(const uint4* __restrict__ w, int64_t n16, unsigned* sink) {
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

template <bool EF>
__global__ void __launch_bounds__(256) ring(const uint8_t* __restrict__ w, unsigned* sink) {
  constexpr int ROWS = 32, STAGES = 4, CHUNK = kStageBytes / ROWS, NST = kRowBytes / CHUNK;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int tid = threadIdx.x;
  const uint64_t pol = evict_first_policy();
  const uint8_t* src[2];
  uint32_t dst[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int id = tid + 256 * i, row = id / (CHUNK / 16), q = id % (CHUNK / 16);
    src[i] = w + (static_cast<int64_t>(blockIdx.x) * ROWS + row) * kRowBytes + 16 * q;
    dst[i] = base + 16 * id;
  }
  int issued = 0;
  auto issue = [&]() {
    if (issued < NST) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint32_t d = dst[i] + (issued % STAGES) * kStageBytes;
        const uint8_t* s = src[i] + issued * CHUNK;
        if (EF)
          asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(d), "l"(s), "l"(pol) : "memory");
        else
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(s) : "memory");
      }
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    ++issued;
  };
  for (int s = 0; s < STAGES - 1; ++s) issue();
  unsigned acc = 0;
  for (int s = 0; s < NST; ++s) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2) : "memory");
    __syncthreads();
    issue();
    const uint4 v = *reinterpret_cast<const uint4*>(smem + (s % STAGES) * kStageBytes + 16 * tid);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

__global__ void read_flush(const uint4* __restrict__ f, int64_t n16, unsigned* sink) {
  unsigned acc = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc ^= f[i].x;
  if (acc == 0x12345678u) *sink = acc;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("# benchmarks/probes/l2_policy.cu: %s, %d SMs, L2 %d MB; read 117 MB (8192x28672 packed); median of 30\n",
         prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  uint8_t* w; unsigned* sink; uint4* f;
  CK(cudaMalloc(&w, kBytes));
  CK(cudaMalloc(&sink, 4));
  CK(cudaMalloc(&f, 256 << 20));
  CK(cudaMemset(f, 1, 256 << 20));
  {
    std::vector<uint8_t> h(kBytes);
    uint32_t x = 12345;
    for (auto& b : h) { x = x * 1664525u + 1013904223u; b = static_cast<uint8_t>(x >> 24); }
    CK(cudaMemcpy(w, h.data(), kBytes, cudaMemcpyHostToDevice));
  }
  const int sms = prop.multiProcessorCount;
  const int smem = 73 * 1024;  // 3 blocks an SM, as the skinny kernel
  CK(cudaFuncSetAttribute(ring<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaFuncSetAttribute(ring<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto median = [&](bool write_flush, auto&& launch) {
    std::vector<float> t;
    for (int i = 0; i < 33; ++i) {
      if (write_flush) CK(cudaMemsetAsync(f, i, 256 << 20));
      else read_flush<<<sms * 4, 256>>>(f, (256 << 20) / 16, sink);
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
  };
  const auto n16 = kBytes / 16;
  auto* w16 = reinterpret_cast<const uint4*>(w);
  std::vector<std::pair<const char*, std::function<void()>>> ks = {
      {"seq LDG.128 x4, 2 blocks/SM, plain", [&] { seq<false><<<sms * 2, 256>>>(w16, n16, sink); }},
      {"seq LDG.128 x4, 2 blocks/SM, evict_first", [&] { seq<true><<<sms * 2, 256>>>(w16, n16, sink); }},
      {"ring 32 rows x 256 B, 4 st, plain", [&] { ring<false><<<kN / 32, 256, smem>>>(w, sink); }},
      {"ring 32 rows x 256 B, 4 st, evict_first", [&] { ring<true><<<kN / 32, 256, smem>>>(w, sink); }},
  };
  for (int round = 0; round < 2; ++round)
    for (bool wf : {true, false})
      for (auto& k : ks) {
        const float ms = median(wf, k.second);
        printf("%-44s after %s flush: %8.4f ms %7.1f GB/s\n", k.first, wf ? "write" : "read ", ms,
               kBytes / (ms * 1e-3) / 1e9);
      }
  return 0;
}
