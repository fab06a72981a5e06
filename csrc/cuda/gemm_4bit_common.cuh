// Shared pieces of the fused 4-bit matmul's CUDA kernels (gemm_4bit.cu and the warpgroup kernel's
// instantiation units gemm_4bit_wg*.cu): the kernels' parameter block, the absmax and pair-table
// helpers, the output store and the shared-memory opt-in.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#include "../gemm_4bit.h"
#include "common.cuh"
#include "gemm_4bit_mma.cuh"

namespace nf4kit {
namespace cuda {
namespace gemm4 {

struct GemmParams {
  const uint8_t* A;        // [M, K] of T, contiguous, 16-byte aligned
  const uint8_t* packed;   // W: N*K nibbles, element 2i in the high nibble
  AbsmaxSource absmax;     // plain or nested
  const void* bias;        // [N] of T (bias_t) or float32, or null
  int bias_t;
  void* out;               // [M, N] of T
  int64_t M, N, K;
  int bs_shift;            // log2(blocksize)
  float code[16];          // decode values (FP4's -0.0 as +0.0)
  // The skinny kernel's folded path (FOLD) holds code * code_mul in its table and divides the scales
  // by it: FP4's codes times 6 are 0, 1/32, 1, 1.5, 2, 3, 4, 6, exact in fp16/bf16, while its codes
  // themselves (2/3, 1/3, 1/6, 1/192) all round one way (down in fp16, up in bf16), a bias of every
  // product that the float32 reference does not have and that no per-weight rounding averages out
  // when the scale multiplies a whole group's sum. 1 for NF4.
  float code_mul;
  // 1: the skinny kernel (and the warpgroup kernel with one batch tile) reads packed W once, so its
  // lines go into L2 as evict_first (l2_read_policy). 0: the default policy (NF4KIT_L2_EVICT_FIRST=0,
  // a development aid).
  int w_evict_first;
};

// The L2 cache policy of a read: evict_first for data read once, so that its lines replace each
// other in L2 instead of the lines already there. After the benchmarks' L2 flush (a 256 MB write)
// those are dirty, and each one a read pushes out is a write-back inside the timed read.
__device__ __forceinline__ uint64_t l2_read_policy(bool evict_first) {
  uint64_t pol;
  if (evict_first) asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  else asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}

// An absmax in two halves, so that its loads can be issued one step before it is needed.
struct RawScale {
  float v = 0.0f;   // plain: the absmax; nested: nested_absmax of its group
  uint32_t q = 0;   // nested: the uint8 code
};
__device__ __forceinline__ RawScale load_scale(const AbsmaxSource& s, int64_t b) {
  RawScale r;
  if (s.absmax_f32 != nullptr) {
    r.v = __ldg(s.absmax_f32 + b);
  } else {
    r.q = __ldg(s.absmax_u8 + b);
    const int64_t k = s.nested_shift >= 0 ? (b >> s.nested_shift) : b / s.nested_blocksize;
    r.v = __ldg(s.nested_absmax + k);
  }
  return r;
}
__device__ __forceinline__ float finish_scale(const AbsmaxSource& s, RawScale r, const float* code8, float off) {
  return s.absmax_f32 != nullptr ? r.v : nested_absmax_value(code8[r.q], r.v, off);
}

// nested_code to shared memory by threads tid = 0 .. n - 1 (caller syncs); the offset, read once.
__device__ __forceinline__ float stage_nested(const AbsmaxSource& s, float* code8, int tid, int n) {
  if (s.absmax_f32 != nullptr) return 0.0f;
  for (int i = tid; i < 256; i += n) code8[i] = s.nested_code[i];
  return __ldg(s.offset);
}
__device__ __forceinline__ float stage_nested(const AbsmaxSource& s, float* code8) {
  return stage_nested(s, code8, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

// Zero an accumulator array (any [A][B][4] tile of mma fragments).
template <int A, int B>
__device__ __forceinline__ void zero_tiles(float (&t)[A][B][4]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) t[a][b][e] = 0.0f;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
// The pair-table entry of byte b of w (b is a constant after unrolling) for this lane: entry v of
// lane l sits at byte offset v * 128 + l * 4, so from tab_lane (the shared address of the table
// plus 4 l, see lane_table) the address is one PRMT (or AND / SHF) and one LEA.
__device__ __forceinline__ uint32_t lookup(uint32_t tab_lane, uint32_t w, int b) {
  const uint32_t v = b == 0 ? (w & 0xFFu) : (b == 3 ? (w >> 24) : __byte_perm(w, 0u, 0x4440u | b));
  uint32_t r;
  asm("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(tab_lane + (v << 7)));
  return r;
}
// The same table, with the byte picked at run time: sel = 0x5504 | (byte << 4) puts byte `byte` of w
// next to lane8 = 8 l in a PRMT, which is v * 256 + 8 l, half of it the entry's offset.
__device__ __forceinline__ uint32_t lookup_sel(uint32_t tab, uint32_t lane8, uint32_t sel, uint32_t w) {
  uint32_t r;
  asm("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(tab + (__byte_perm(w, lane8, sel) >> 1)));
  return r;
}
// Where a kernel's dynamic shared memory starts when it has no static shared memory: on sm_90 the
// 1 KB the driver reserves a block comes first (benchmarks/probes/smem_base.cu, H200, driver 580).
// The warpgroup kernel's wide pair table sits there, so that its address is a load's immediate;
// the host checks it once (wg_wide_table_ok) and the kernel asserts it.
constexpr uint32_t kDynSmemBase = 1024;
// The pair table with 256-byte rows at kDynSmemBase (entry v of lane l at kDynSmemBase + 256 v +
// 4 l): the same sel as lookup_sel's puts byte `byte` of w next to lane4 = 4 l, which is 256 v + 4 l;
// the table's address is the load's immediate. One PRMT a lookup (lookup_sel: PRMT and LEA.HI).
__device__ __forceinline__ uint32_t wg_lookup(uint32_t lane4, uint32_t sel, uint32_t w) {
  uint32_t r;
  asm("ld.shared.u32 %0, [%1+%2];\n" : "=r"(r) : "r"(__byte_perm(w, lane4, sel)), "n"(kDynSmemBase));
  return r;
}
// This lane's view of the table as one opaque register (otherwise the compiler splits the
// window base back out and spends an extra add on every lookup).
__device__ __forceinline__ uint32_t lane_table(const void* table, int lane) {
  uint32_t a = mma::smem_addr(table) + 4u * lane;
  asm volatile("" : "+r"(a));
  return a;
}

// bias[n] as a float (the host passes it in the output dtype T or in float32, as the caller gave it)
template <typename T>
__device__ __forceinline__ float bias_at(const GemmParams& p, int64_t n) {
  return p.bias_t ? DType<T>::to_float(static_cast<const typename DType<T>::cuda_t*>(p.bias)[n])
                  : static_cast<const float*>(p.bias)[n];
}

template <typename T>
__device__ __forceinline__ void store_out(const GemmParams& p, int64_t m, int64_t n, float v) {
  if (m < p.M && n < p.N) {
    if (p.bias != nullptr) v += bias_at<T>(p, n);
    reinterpret_cast<typename DType<T>::cuda_t*>(p.out)[m * p.N + n] = DType<T>::from_float(v);
  }
}

// Raises a kernel's dynamic shared-memory limit, once per kernel and device.
template <typename Kernel>
void allow_smem(Kernel* kernel, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mu);
  if (done.insert({reinterpret_cast<const void*>(kernel), dev}).second)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}


}  // namespace gemm4
}  // namespace cuda
}  // namespace nf4kit
