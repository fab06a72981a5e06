// Standalone probe (no torch) behind the store and grid choices of the streaming kernels
// (common.cuh: store16, full_grid): dequantize-4bit's memory pattern (NF4, nested absmax, fp16 out,
// an 8192 x 28672 weight: 117 MB read, 470 MB written) with evict-first vs plain vs
// L1::no_allocate stores, 2048 vs 4096-element warp tiles, a resident grid striding vs one tile
// per warp, and TMA bulk stores from shared memory; beside a device copy, a write-only kernel and
// an "expand" kernel with the same traffic and no decode. Median of 30, L2 flushed before each.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/dequant_stores benchmarks/probes/dequant_stores.cu && /tmp/dequant_stores
// Results: benchmarks/results/<gpu>/dequant_stores.txt
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e_), __LINE__); exit(1);} } while (0)

__constant__ float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
  -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f,
  0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f,
  0.5626170039176941f, 0.7229568362236023f, 1.0f};

struct Src { const uint8_t* q; const float* nabs; const float* code8; const float* offset; };

__device__ __forceinline__ uint32_t pack2h(float a, float b) { __half2 h = __floats2half2_rn(a, b); return *reinterpret_cast<uint32_t*>(&h); }

template <int STORE>  // 0 stcs, 1 plain, 3 st.global.L1::no_allocate
__device__ __forceinline__ void st16(void* p, uint4 v) {
  if constexpr (STORE == 0) __stcs(reinterpret_cast<uint4*>(p), v);
  else if constexpr (STORE == 1) *reinterpret_cast<uint4*>(p) = v;
  else asm volatile("st.global.L1::no_allocate.v4.u32 [%0], {%1,%2,%3,%4};" :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// TILE elements per warp-step; STORE 0/1/3 direct, 2 = TMA bulk store from smem; PERSIST: grid-stride resident grid.
template <int TILE, int STORE, bool PERSIST>
__global__ void __launch_bounds__(256) deq(const uint8_t* __restrict__ packed, Src src, int64_t n, __half* __restrict__ out) {
  extern __shared__ __align__(128) unsigned char dsm[];
  __shared__ float s_dec[16];
  __shared__ float s_code8[256];
  if (threadIdx.x < 16) s_dec[threadIdx.x] = kNF4[threadIdx.x];
  s_code8[threadIdx.x] = src.code8[threadIdx.x];
  const float off = __ldg(src.offset);
  __syncthreads();
  constexpr int U = TILE / 256;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ntiles = n / TILE;  // n is a multiple of TILE here
  const int64_t step = PERSIST ? (int64_t)gridDim.x * 8 : ntiles;
  unsigned char* wbuf = dsm + warp * (2 * TILE * 2);
  int bufi = 0;
  for (int64_t t = (int64_t)blockIdx.x * 8 + warp; t < ntiles; t += step) {
    const int64_t tile0 = t * TILE + lane * 8;
    uint32_t w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) w[u] = __ldcs(reinterpret_cast<const unsigned*>(packed + ((tile0 + u * 256) >> 1)));
    const int64_t first = (t * TILE) >> 6;
    float s[TILE / 64 / 32 > 0 ? TILE / 64 / 32 : 1];
#pragma unroll
    for (int r = 0; r < TILE / 64 / 32; ++r) {
      const int64_t j = first + lane + 32 * r;
      s[r] = __fadd_rn(__fmul_rn(s_code8[__ldg(src.q + j)], __ldg(src.nabs + (j >> 8))), off);
    }
    if constexpr (STORE == 2) {
      if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      __syncwarp();
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = (u * 256 + lane * 8) >> 6;
      float scale = __shfl_sync(0xffffffffu, s[0], idx & 31);
      if constexpr (TILE == 4096) { const float s1 = __shfl_sync(0xffffffffu, s[TILE / 2048 - 1], idx & 31); scale = idx >= 32 ? s1 : scale; }
      const char* table = reinterpret_cast<const char*>(s_dec);
      const uint32_t hi4 = (w[u] >> 2) & 0x3C3C3C3Cu, lo4 = (w[u] << 2) & 0x3C3C3C3Cu;
      float f[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        f[2 * b] = __fmul_rn(*reinterpret_cast<const float*>(table + __byte_perm(hi4, 0u, 0x4440u | b)), scale);
        f[2 * b + 1] = __fmul_rn(*reinterpret_cast<const float*>(table + __byte_perm(lo4, 0u, 0x4440u | b)), scale);
      }
      uint4 v = make_uint4(pack2h(f[0], f[1]), pack2h(f[2], f[3]), pack2h(f[4], f[5]), pack2h(f[6], f[7]));
      if constexpr (STORE == 2) *reinterpret_cast<uint4*>(wbuf + bufi * TILE * 2 + (u * 256 + lane * 8) * 2) = v;
      else st16<STORE>(out + tile0 + u * 256, v);
    }
    if constexpr (STORE == 2) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      __syncwarp();
      if (lane == 0) {
        const uint32_t sa = static_cast<uint32_t>(__cvta_generic_to_shared(wbuf + bufi * TILE * 2));
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(out + t * TILE), "r"(sa), "n"(TILE * 2) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
      bufi ^= 1;
    }
  }
  if constexpr (STORE == 2) { if (lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
}

// Roofs
__global__ void __launch_bounds__(256) write_only(uint4* __restrict__ out, int64_t nvec) {
  for (int64_t i = (int64_t)blockIdx.x * 256 + threadIdx.x; i < nvec; i += (int64_t)gridDim.x * 256) __stcs(out + i, make_uint4(i, 1, 2, 3));
}
template <int TILE>
__global__ void __launch_bounds__(256) expand(const uint8_t* __restrict__ packed, int64_t n, __half* __restrict__ out) {
  constexpr int U = TILE / 256;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ntiles = n / TILE;
  for (int64_t t = (int64_t)blockIdx.x * 8 + warp; t < ntiles; t += (int64_t)gridDim.x * 8) {
    const int64_t tile0 = t * TILE + lane * 8;
    uint32_t w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) w[u] = __ldcs(reinterpret_cast<const unsigned*>(packed + ((tile0 + u * 256) >> 1)));
#pragma unroll
    for (int u = 0; u < U; ++u) __stcs(reinterpret_cast<uint4*>(out + tile0 + u * 256), make_uint4(w[u], w[u] ^ 1, w[u] ^ 2, w[u] ^ 3));
  }
}

int main() {
  const int64_t n = 8192LL * 28672;
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0)); printf("%s, %d SMs\n", prop.name, sms);
  uint8_t *packed, *q; float *nabs, *code8, *offset; __half *out, *ref; void* flush;
  CK(cudaMalloc(&packed, n / 2)); CK(cudaMalloc(&q, n / 64)); CK(cudaMalloc(&nabs, n / 64 / 256 * 4 + 16));
  CK(cudaMalloc(&code8, 1024)); CK(cudaMalloc(&offset, 4)); CK(cudaMalloc(&out, n * 2)); CK(cudaMalloc(&ref, n * 2));
  CK(cudaMalloc(&flush, 256 << 20));
  { std::vector<uint8_t> h(n / 2); uint64_t x = 88172645463325252ull; for (auto& b : h) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; b = (uint8_t)x; }
    CK(cudaMemcpy(packed, h.data(), n / 2, cudaMemcpyHostToDevice)); CK(cudaMemcpy(q, h.data(), n / 64, cudaMemcpyHostToDevice));
    std::vector<float> f(n / 64 / 256 + 4); for (auto& v : f) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; v = 0.01f + (x % 1000) * 1e-5f; }
    CK(cudaMemcpy(nabs, f.data(), f.size() * 4, cudaMemcpyHostToDevice));
    std::vector<float> c(256); for (int i = 0; i < 256; ++i) c[i] = (i - 128) / 128.0f; CK(cudaMemcpy(code8, c.data(), 1024, cudaMemcpyHostToDevice));
    float o = 0.05f; CK(cudaMemcpy(offset, &o, 4, cudaMemcpyHostToDevice)); }
  Src src{q, nabs, code8, offset};
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  auto timeit = [&](const char* name, double bytes, auto&& fn) {
    for (int i = 0; i < 3; ++i) fn();
    std::vector<float> ts;
    for (int i = 0; i < 30; ++i) {
      CK(cudaMemsetAsync(flush, i, 256 << 20));
      CK(cudaEventRecord(e0)); fn(); CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
      float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); ts.push_back(ms);
    }
    CK(cudaGetLastError());
    std::sort(ts.begin(), ts.end());
    const double med = ts[ts.size() / 2];
    printf("%-44s %8.4f ms  %7.1f GB/s\n", name, med, bytes / med / 1e6);
    return med;
  };
  const double bytes = n / 2 + n / 64 + n * 2.0 + n / 64 / 256 * 4;
  double copy = timeit("memcpy D2D 470MB (r+w)", 2.0 * n * 2, [&] { CK(cudaMemcpyAsync(ref, out, n * 2, cudaMemcpyDeviceToDevice)); });
  printf("copy BW %.1f GB/s; 85%% target for dequant = %.4f ms\n", 2.0 * n * 2 / copy / 1e6, bytes / (0.85 * 2.0 * n * 2 / copy));
  timeit("write-only 470MB", n * 2.0, [&] { write_only<<<sms * 8, 256>>>(reinterpret_cast<uint4*>(out), n * 2 / 16); });
  timeit("expand r117 w470 (tile 2048, persistent)", bytes, [&] { expand<2048><<<sms * 8, 256>>>(packed, n, out); });
  timeit("expand r117 w470 (tile 4096, persistent)", bytes, [&] { expand<4096><<<sms * 8, 256>>>(packed, n, out); });
  timeit("expand r117 w470 (tile 2048, one per warp)", bytes, [&] { expand<2048><<<n / 2048 / 8, 256>>>(packed, n, out); });
  // reference output
  deq<2048, 0, true><<<sms * 8, 256>>>(packed, src, n, ref); CK(cudaDeviceSynchronize());
  std::vector<uint16_t> hr(n), ho(n);
  CK(cudaMemcpy(hr.data(), ref, n * 2, cudaMemcpyDeviceToHost));
  auto check = [&](const char* name) { CK(cudaMemcpy(ho.data(), out, n * 2, cudaMemcpyDeviceToHost)); if (memcmp(ho.data(), hr.data(), n * 2)) printf("  MISMATCH %s\n", name); };
  auto run = [&](const char* name, auto kernel, int grid, int smem) {
    if (smem > 48 * 1024) CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int occ = 0; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, 256, smem));
    if (grid == 0) grid = sms * occ;
    CK(cudaMemset(out, 0xFF, n * 2));
    char nm[128]; snprintf(nm, sizeof nm, "%s occ%d grid%d", name, occ, grid);
    timeit(nm, bytes, [&] { kernel<<<grid, 256, smem>>>(packed, src, n, out); });
    check(name);
  };
  run("deq 2048 stcs persistent (current)", deq<2048, 0, true>, 0, 0);
  run("deq 2048 plain persistent", deq<2048, 1, true>, 0, 0);
  run("deq 2048 no_allocate persistent", deq<2048, 3, true>, 0, 0);
  run("deq 4096 stcs persistent", deq<4096, 0, true>, 0, 0);
  run("deq 2048 stcs one tile/warp", deq<2048, 0, false>, n / 2048 / 8, 0);
  run("deq 4096 stcs one tile/warp", deq<4096, 0, false>, n / 4096 / 8, 0);
  run("deq 2048 plain one tile/warp", deq<2048, 1, false>, n / 2048 / 8, 0);
  run("deq 2048 TMA persistent", deq<2048, 2, true>, 0, 8 * 2 * 4096);
  run("deq 2048 TMA one tile/warp", deq<2048, 2, false>, n / 2048 / 8, 8 * 2 * 4096);
  run("deq 4096 TMA persistent", deq<4096, 2, true>, 0, 8 * 2 * 8192);
  for (int mult : {2, 4, 16}) {
    char nm[64]; snprintf(nm, sizeof nm, "deq 2048 stcs grid %dx sms", mult);
    run(nm, deq<2048, 0, true>, sms * mult, 0);
  }
  return 0;
}
