// Warpgroup (wgmma, sm_90a) building blocks of the fused 4-bit matmul's warpgroup kernel
// (gemm4_wg_kernel in csrc/cuda/gemm_4bit.cu, batches past the skinny kernel's): mbarriers, 2-D TMA
// loads, the K-major 128-byte-swizzle matrix descriptor and m64nNk16 wgmma with A from registers.
//
// The kernel: W is wgmma's A operand, taken from registers: each warp decodes its 16 rows of a
// 64-wide k tile straight into the A fragments (the layout of mma.sync m16n8k16's A, one warp per
// 16 rows) through the per-lane byte -> pair table, scaled by the block's absmax; the activations
// are the B operand, BN batch rows x 64 k per tile in shared memory (K-major, 128-byte swizzle)
// read by the tensor cores through a descriptor. No decoded W ever reaches shared memory. Block: 2
// warpgroups x 64 W rows, BN batch rows; a producer loads each tile (activations and packed W) by
// TMA into an S-slot ring (a ninth warp at batch tiles 32 and 128 and at 64 with stream-K, a third
// warpgroup at 256, thread 0 between its own steps at 64 otherwise: launch_wg), full/empty mbarriers
// per slot; per tile each warp waits for its tile,
// decodes (overlapping the tensor cores' work on the previous tile), issues four wgmma (k16 each)
// as one group, waits for the previous group and releases that tile's slot.
#pragma once

#include <cstdint>
#include <type_traits>

#include "gemm_4bit_mma.cuh"

namespace nf4kit {
namespace cuda {
namespace wg {

// Register reallocation between the warpgroups of a block (all threads of a warpgroup execute it).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// mbarrier (shared::cta) with a transaction count, completed by the tensor-copy engine (TMA).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// After the inits, before any copy may complete on them (then a barrier of the block).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// TMA: the box at (c0 innermost, c1) of a 2-D tensor map into shared memory, completing on bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
// The same with an L2 cache policy (l2_read_policy).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(bar), "l"(pol)
      : "memory");
}

// Matrix descriptor of a K-major tile with 128-byte rows, 128-byte swizzle (16-byte chunk c of row r
// at r * 128 + ((c ^ (r % 8)) << 4), the tile 1024-byte aligned), 8-row groups 1024 bytes apart.
// Fields: start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29, unused here: 1), stride
// byte offset >> 4 (32-45), swizzle mode (62-63, 1 = 128 bytes). Kept as two words: the low one
// (start address and leading offset, desc_lo_k_sw128) varies, the high one is the constant kDescHi,
// joined inside the wgmma's asm. A tile or k16 step at +bytes adds bytes >> 4 to the low word (k16
// step j: + 2 j): shared addresses stay below 256 KB, so the 14-bit start field never carries.
constexpr uint32_t kDescHi = (1024 >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t desc_lo_k_sw128(uint32_t smem_address) {
  return ((smem_address & 0x3FFFFu) >> 4) | (1u << 16);
}

// d (64 x N float32, the m64nN accumulator layout) += a (64 x 16 from registers) * B (N x 16, K-major
// in shared memory, by descriptor).
// The accumulator operands: registers %0 .. %(N/2 - 1), then A's four and the descriptor.
#define NF4KIT_WG_R16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define NF4KIT_WG_R32 NF4KIT_WG_R16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define NF4KIT_WG_R64 NF4KIT_WG_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define NF4KIT_WG_R128 NF4KIT_WG_R64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define NF4KIT_WG_D16 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define NF4KIT_WG_D32 NF4KIT_WG_D16, \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define NF4KIT_WG_D64 NF4KIT_WG_D32, \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define NF4KIT_WG_D128 NF4KIT_WG_D64, \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
// One m64nNk16 wgmma with A from registers, scale-d = 1 (accumulate), no transposes; A0..ONE name the
// operands after the N / 2 accumulators (DESC the descriptor's low word) and HI, without its '%', the
// high word's (the constant kDescHi, joined to DESC in the asm).
#define NF4KIT_WG_MMA_RS(SHAPE, TY, REGS, DOPS, A0, A1, A2, A3, DESC, ONE, HI)                          \
  asm volatile("{\n.reg .pred p;\n.reg .b64 dsc;\nsetp.ne.b32 p, " ONE ", 0;\n"                    \
               "mov.b64 dsc, {" DESC ", %" HI "};\n"                                                 \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " {" REGS "}, {" A0 ", " A1 ", " A2 \
               ", " A3 "}, dsc, p, 1, 1, 0;\n}\n"                                                  \
               : DOPS                                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(desc_lo), "r"(1), "r"(kDescHi))

template <typename T, int N>
__device__ __forceinline__ void mma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint32_t desc_lo) {
  static_assert(N == 32 || N == 64 || N == 128 || N == 256, "m64nNk16 with N = 32, 64, 128 or 256");
  constexpr bool H = std::is_same_v<T, at::Half>;
  if constexpr (N == 32) {
    if constexpr (H) NF4KIT_WG_MMA_RS("m64n32k16", "f16", NF4KIT_WG_R16, NF4KIT_WG_D16, "%16", "%17", "%18", "%19", "%20", "%21", "22");
    else NF4KIT_WG_MMA_RS("m64n32k16", "bf16", NF4KIT_WG_R16, NF4KIT_WG_D16, "%16", "%17", "%18", "%19", "%20", "%21", "22");
  } else if constexpr (N == 64) {
    if constexpr (H) NF4KIT_WG_MMA_RS("m64n64k16", "f16", NF4KIT_WG_R32, NF4KIT_WG_D32, "%32", "%33", "%34", "%35", "%36", "%37", "38");
    else NF4KIT_WG_MMA_RS("m64n64k16", "bf16", NF4KIT_WG_R32, NF4KIT_WG_D32, "%32", "%33", "%34", "%35", "%36", "%37", "38");
  } else if constexpr (N == 128) {
    if constexpr (H) NF4KIT_WG_MMA_RS("m64n128k16", "f16", NF4KIT_WG_R64, NF4KIT_WG_D64, "%64", "%65", "%66", "%67", "%68", "%69", "70");
    else NF4KIT_WG_MMA_RS("m64n128k16", "bf16", NF4KIT_WG_R64, NF4KIT_WG_D64, "%64", "%65", "%66", "%67", "%68", "%69", "70");
  } else {
    if constexpr (H) NF4KIT_WG_MMA_RS("m64n256k16", "f16", NF4KIT_WG_R128, NF4KIT_WG_D128, "%128", "%129", "%130", "%131", "%132", "%133", "134");
    else NF4KIT_WG_MMA_RS("m64n256k16", "bf16", NF4KIT_WG_R128, NF4KIT_WG_D128, "%128", "%129", "%130", "%131", "%132", "%133", "134");
  }
}
#undef NF4KIT_WG_MMA_RS

}  // namespace wg
}  // namespace cuda
}  // namespace nf4kit
