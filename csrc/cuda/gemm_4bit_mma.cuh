// Tensor-core building blocks of the fused 4-bit matmul (csrc/cuda/gemm_4bit.cu): PTX wrappers
// for cp.async, ldmatrix and mma.sync m16n8k16 (sm_80+), and the byte -> two-weights decode
// table that lets one shared-memory load turn a packed byte into a 16-bit pair.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace nf4kit {
namespace cuda {
namespace mma {

// ---------------------------------------------------------------------------------------------
// Async copies (global -> shared, 16 bytes, L2 only) and their groups.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes, or writes 16 zero bytes when !pred (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------
// ldmatrix / mma.sync
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// d += a (16x16, row) * b (16x8, col), float32 accumulators. T: at::Half or at::BFloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, at::Half>) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---------------------------------------------------------------------------------------------
// 16-bit pairs in uint32 registers
// ---------------------------------------------------------------------------------------------
// Both halves = s rounded to T.
template <typename T>
__device__ __forceinline__ uint32_t splat2(float s) {
  if constexpr (std::is_same_v<T, at::Half>) {
    const __half2 h = __float2half2_rn(s);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __float2bfloat162_rn(s);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}
// Lane-wise product of two pairs, rounded to T.
template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  if constexpr (std::is_same_v<T, at::Half>) {
    const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const __nv_bfloat162 r =
        __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
}

// ---------------------------------------------------------------------------------------------
// Pair table: packed byte v -> (T(code[v >> 4]), T(code[v & 15])) as one uint32 (the element of
// the high nibble, which comes first, in the low half). 256 entries, one copy per lane (entry v
// of lane l at word v * 32 + l), so a warp's 32 lookups of random bytes hit 32 distinct banks.
// 32 KB of shared memory; a weight is then table(byte) * T(absmax): two roundings (code to T,
// product to T) instead of the reference's one, within the tests' 2x-of-baseline error bound.
// ---------------------------------------------------------------------------------------------
constexpr int kPairTableWords = 256 * 32;
constexpr int kPairTableBytes = kPairTableWords * 4;

// Built by threads tid = 0 .. n - 1 (n a multiple of 32, whole warps): thread tid makes entry v =
// tid (+ n ...) once, from the code values its warp holds one a lane (shuffles, not 32 indexed
// constant loads), and stores its 32 copies, copy (v + j) % 32 at step j, so that the 32 lanes of a
// store hit 32 distinct banks. (Before: one store a round, two dependent constant loads each, 28-32
// rounds a warp: 6-7% of the warpgroup kernel's samples on 4096x4096 at batch 128.) ROW: words from
// one entry's copies to the next's (32; 64 for the warpgroup kernel's wide table, upper halves unused).
template <typename T, int ROW = 32>
__device__ __forceinline__ void build_pair_table(uint32_t* tab, const float (&code)[16], int tid, int n) {
  const float mine = code[tid & 15];
  for (int v = tid; v < 256; v += n) {
    const uint32_t e = pack2<T>(__shfl_sync(0xFFFFFFFFu, mine, v >> 4), __shfl_sync(0xFFFFFFFFu, mine, v & 15));
#pragma unroll
    for (int j = 0; j < 32; ++j) tab[v * ROW + ((v + j) & 31)] = e;
  }
}
template <typename T>
__device__ __forceinline__ void build_pair_table(uint32_t* tab, const float (&code)[16]) {
  build_pair_table<T>(tab, code, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

}  // namespace mma
}  // namespace cuda
}  // namespace nf4kit
