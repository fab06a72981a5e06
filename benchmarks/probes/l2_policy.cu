// Standalone probe (no torch), twenty-second session: does the L2 eviction policy of a streaming
// read change its speed after the benchmark's L2 flush? triton's do_bench (and FlushTimer) flush L2
// by writing a 256 MB buffer, so the read that follows finds L2 full of dirty lines; every line it
// brings in with the default (evict_normal) policy can push one of them out to DRAM, a write inside
// the timed read. A read whose lines are evict_first replaces its own clean lines instead.
// Reads the 117 MB packed 8192 x 28672 weight two ways, each plain and with evict_first:
//  * seq: grid-stride LDG.128, 4 loads in flight a thread (plain: ld.global.nc; ef: ld.global.nc.L2::cache_hint);
//  * ring: tile_ring (read_common.cuh), the skinny kernel's pattern, 32 rows a block, 8 KB stages by
//    cp.async.cg into a 4-stage ring (plain, or .L2::cache_hint with an evict_first policy), padded
//    to 3 blocks an SM;
// after a write flush (memset of 256 MB: dirty L2, as do_bench) and after a read flush (reading
// 256 MB: clean L2). Median of 30, two rounds. Run 2 of the twenty-second session:
// benchmarks/results/h200/experiments/l2_policy_s22_run2.txt.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/l2_policy benchmarks/probes/l2_policy.cu && /tmp/l2_policy
#include <functional>
#include "read_common.cuh"

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("# benchmarks/probes/l2_policy.cu: %s, %d SMs, L2 %d MB; read 117 MB (8192x28672 packed); median of 30\n",
         prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  uint8_t* w; unsigned* sink;
  CK(cudaMalloc(&w, kBytes));
  CK(cudaMalloc(&sink, 4));
  fill_weight(w);
  const int sms = prop.multiProcessorCount;
  const int smem = 73 * 1024;  // 3 blocks an SM, as the skinny kernel
  auto* ring_plain = &tile_ring<32, 4, false, false>;
  auto* ring_ef = &tile_ring<32, 4, false, true>;
  CK(cudaFuncSetAttribute(ring_plain, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaFuncSetAttribute(ring_ef, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  FlushTimer timer;
  const auto n16 = kBytes / 16;
  auto* w16 = reinterpret_cast<const uint4*>(w);
  std::vector<std::pair<const char*, std::function<void()>>> ks = {
      {"seq LDG.128 x4, 2 blocks/SM, plain", [&] { seq_policy<false><<<sms * 2, 256>>>(w16, n16, sink); }},
      {"seq LDG.128 x4, 2 blocks/SM, evict_first", [&] { seq_policy<true><<<sms * 2, 256>>>(w16, n16, sink); }},
      {"ring 32 rows x 256 B, 4 st, plain", [&] { ring_plain<<<kN / 32, 256, smem>>>(w, 0, sink); }},
      {"ring 32 rows x 256 B, 4 st, evict_first", [&] { ring_ef<<<kN / 32, 256, smem>>>(w, 0, sink); }},
  };
  for (int round = 0; round < 2; ++round)
    for (bool dirty : {true, false})
      for (auto& k : ks) {
        const float ms = timer.median_ms(k.second, dirty);
        printf("%-44s after %s flush: %8.4f ms %7.1f GB/s\n", k.first, dirty ? "write" : "read ", ms,
               kBytes / (ms * 1e-3) / 1e9);
      }
  return 0;
}
