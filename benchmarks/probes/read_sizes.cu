// Standalone probe (no torch), twenty-fourth session: how a streaming read's time grows with the bytes
// read at K = 8192, N = 16896 .. 50688 (69 .. 208 MB packed), so that its fixed part (launch, first
// bytes, tail, the flush's dirty L2) and its per-byte rate can be told apart, as for the skinny
// kernel's times over the same N (benchmarks/results/h200/experiments/waves_s24_run6.txt). Three
// kernels: an empty one (one block), the grid-stride evict_first read (seq, 2 blocks an SM) and the
// skinny kernel's ring pattern, evict_first (tile_ring, 32 rows a block, 3 blocks an SM); after the
// write flush (as the benchmark) and after a read flush. Median of 30.
// Call 7 of the twenty-fourth session ran it with its own copy of the seq kernel, since moved to
// read_common.cuh as seq_policy (the same main loop; its tail then read plainly).
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/read_sizes benchmarks/probes/read_sizes.cu && /tmp/read_sizes
#include <functional>
#include "read_common.cuh"

__global__ void empty_kernel(unsigned* sink) {
  if (threadIdx.x == 1000) *sink = 1;
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int64_t ns[] = {16896, 25344, 28672, 33792, 38016, 50688};
  const int64_t max_bytes = 50688 * kRowBytes;
  printf("# benchmarks/probes/read_sizes.cu: %s, %d SMs; K = 8192 packed (4096 B a row); median of 30\n", prop.name,
         prop.multiProcessorCount);
  uint8_t* w; unsigned* sink;
  CK(cudaMalloc(&w, max_bytes));
  CK(cudaMalloc(&sink, 4));
  fill_weight(w, max_bytes);
  const int sms = prop.multiProcessorCount;
  const int smem = 73 * 1024;  // 3 blocks an SM, as the skinny kernel
  auto* ring_ef = &tile_ring<32, 4, false, true>;
  CK(cudaFuncSetAttribute(ring_ef, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  FlushTimer timer;
  for (int round = 0; round < 2; ++round)
    for (bool dirty : {true, false}) {
      printf("%s flush:  %-7s %-9s | %-20s | %-20s\n", dirty ? "write" : "read ", "N", "MB", "seq evict_first", "ring evict_first");
      printf("empty kernel %.4f ms\n", timer.median_ms([&] { empty_kernel<<<1, 32>>>(sink); }, dirty));
      for (int64_t n : ns) {
        const int64_t bytes = n * kRowBytes;
        const float a = timer.median_ms([&] { seq_policy<true><<<sms * 2, 256>>>(reinterpret_cast<const uint4*>(w), bytes / 16, sink); }, dirty);
        const float b = timer.median_ms([&] { ring_ef<<<static_cast<unsigned>(n / 32), 256, smem>>>(w, 0, sink); }, dirty);
        printf("  %7lld %9.1f | %8.4f ms %6.0f GB/s | %8.4f ms %6.0f GB/s\n", static_cast<long long>(n), bytes / 1e6, a,
               bytes / (a * 1e-3) / 1e9, b, bytes / (b * 1e-3) / 1e9);
      }
    }
  return 0;
}
