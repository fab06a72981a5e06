// Probe (device): the shared-window address where a kernel's dynamic shared memory starts, for a
// kernel with no static shared memory (as the skinny and warpgroup kernels), at a small and at the
// largest opt-in size. H200, driver 580 (sixteenth session): 1024 at every size (the 1 KB the driver
// reserves a block comes first). The warpgroup kernel's wide pair table sits there and its lookups
// take that address as a constant (kDynSmemBase; the host checks it with the same kind of kernel,
// wg_wide_table_ok).
//   nvcc -O2 -arch=sm_90a -o /tmp/smem_base benchmarks/probes/smem_base.cu && /tmp/smem_base
#include <cstdio>
#include <cstdint>

__global__ void base(uint32_t* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(smem));
  if (threadIdx.x == 0) *out = a;
}

int main() {
  uint32_t* d;
  cudaMalloc(&d, 4);
  const int sizes[] = {1024, 64 * 1024, 227 * 1024};
  cudaFuncSetAttribute(base, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024);
  for (int s : sizes) {
    cudaMemset(d, 0xFF, 4);
    base<<<1, 32, s>>>(d);
    uint32_t h = 0;
    cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost);
    printf("dynamic shared memory %6d bytes: starts at shared address %u (%s)\n", s, h,
           cudaGetErrorString(cudaGetLastError()));
  }
  return 0;
}
