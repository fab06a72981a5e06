// Device helpers shared by every nf4kit CUDA kernel: the 4-bit code tables, nibble decode, the
// nested-absmax decode, float conversions that match the CPU reference bit for bit, 16-byte
// vector memory helpers and the launch check. Host-side rules (tables, bucket15, new_output)
// live in ../common.h, included here.
//
// Exactness rules (see nf4kit/reference.py): every float step is a single IEEE operation,
// rounded to nearest even; nothing may be contracted into an FMA, so the helpers below spell
// the operations with __fmul_rn / __fadd_rn. Never build with --use_fast_math or -ftz: an absmax
// of 1e-38 (subnormal neighbourhood) must behave as on the CPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common.h"

// Dispatch on the three float dtypes the ops take (NF4KIT_DISPATCH_FLOAT also instantiates
// double, which no op accepts: a dead instantiation costs device compile time).
#define NF4KIT_CUDA_DISPATCH_FLOAT(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// After every kernel launch: raises a c10::Error carrying the CUDA error string.
#define NF4KIT_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace nf4kit {
namespace cuda {

// Host dispatch on a runtime bool: calls f with std::true_type or std::false_type, so that f can
// name a template instantiation by it.
template <typename F>
void bool_switch(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// ---------------------------------------------------------------------------------------------
// Code tables
// ---------------------------------------------------------------------------------------------

// What dequantization multiplies by, index = 4-bit code. FP4's code 8 (-0.0) reads as +0.0.
// `static` keeps one copy per translation unit (no -rdc, no duplicate host shadows).
static __constant__ float kDecodeNF4[16] = NF4KIT_NF4_CODE;
static __constant__ float kDecodeFP4[16] = {
    0.0f / 12.0f,  0.0625f / 12.0f,  8.0f / 12.0f,  12.0f / 12.0f,  4.0f / 12.0f,  6.0f / 12.0f,
    2.0f / 12.0f,  3.0f / 12.0f,     0.0f,          -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f,
    -4.0f / 12.0f, -6.0f / 12.0f,    -2.0f / 12.0f, -3.0f / 12.0f};

// The decode table of a quant type in constant memory. Reading it with an index that differs
// across a warp serialises; kernels copy it to shared memory first (load_decode_table).
__device__ __forceinline__ const float* decode_table(QuantType qt) {
  return qt == QuantType::NF4 ? kDecodeNF4 : kDecodeFP4;
}

// Copy the 16-entry decode table into shared memory (threads 0..15 write; caller syncs).
// A 16-word shared table is read conflict-free: 16 distinct words sit in 16 distinct banks.
__device__ __forceinline__ void load_decode_table(float* smem16, QuantType qt) {
  if (threadIdx.x < 16) smem16[threadIdx.x] = decode_table(qt)[threadIdx.x];
}

// One 4-bit code -> its value, from a (shared-memory) decode table.
__device__ __forceinline__ float decode_nibble(const float* table16, uint32_t q) { return table16[q & 15u]; }

// Byte b of a packed stream holds element 2b in its high nibble and 2b+1 in its low nibble.
__device__ __forceinline__ uint32_t hi_nibble(uint32_t byte) { return (byte >> 4) & 15u; }
__device__ __forceinline__ uint32_t lo_nibble(uint32_t byte) { return byte & 15u; }

// ---------------------------------------------------------------------------------------------
// Nested absmax: absmax[j] = nested_code[q[j]] * nested_absmax[j / nested_blocksize] + offset,
// each step rounded to float32 (reference.dequantize_nested_absmax).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float nested_absmax_value(float code_value, float nested_scale, float offset) {
  return __fadd_rn(__fmul_rn(code_value, nested_scale), offset);
}

// The absmax of 4-bit block j, plain (float32 absmax) or nested (uint8 codes). The nested
// arguments are null for plain absmax. nested_code may point to shared or global memory.
struct AbsmaxSource {
  const float* absmax_f32 = nullptr;     // plain: float32 [nblocks]; else null
  const uint8_t* absmax_u8 = nullptr;    // nested: uint8 codes [nblocks]; else null
  const float* nested_absmax = nullptr;  // nested: float32 [ceil(nblocks / nested_blocksize)]
  const float* nested_code = nullptr;    // nested: float32 [256]
  const float* offset = nullptr;         // nested: float32 [1]
  int64_t nested_blocksize = 256;
  int nested_shift = 8;                  // log2(nested_blocksize), or -1 when not a power of two

  void set_nested_blocksize(int64_t nbs) {
    nested_blocksize = nbs;
    nested_shift = (nbs & (nbs - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(nbs)) : -1;
  }

  // code256: nested_code, e.g. staged in shared memory; off: *offset, read once per thread.
  __device__ __forceinline__ float get(int64_t j, const float* code256, float off) const {
    if (absmax_f32 != nullptr) return __ldg(absmax_f32 + j);
    const uint32_t q = __ldg(absmax_u8 + j);
    const int64_t k = nested_shift >= 0 ? (j >> nested_shift) : j / nested_blocksize;
    return nested_absmax_value(code256[q], __ldg(nested_absmax + k), off);
  }
};

// ---------------------------------------------------------------------------------------------
// Float conversions (round to nearest even, overflow to inf, as torch's CPU .to(dtype)).
// NaN payloads are not canonicalised: a NaN stays a NaN (tests compare NaN positions).
// ---------------------------------------------------------------------------------------------
template <typename T> struct DType;
template <> struct DType<float> {
  using cuda_t = float;
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};
template <> struct DType<at::Half> {
  using cuda_t = __half;
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct DType<at::BFloat16> {
  using cuda_t = __nv_bfloat16;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Two floats -> two 16-bit values packed in a uint32 (lo = a), or one float's bits.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<at::Half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<at::BFloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Unpack 16-bit pairs / float words held in uint32 registers.
template <typename T> __device__ __forceinline__ float unpack_lo(uint32_t w);
template <typename T> __device__ __forceinline__ float unpack_hi(uint32_t w);
template <> __device__ __forceinline__ float unpack_lo<at::Half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
}
template <> __device__ __forceinline__ float unpack_hi<at::Half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
template <> __device__ __forceinline__ float unpack_lo<at::BFloat16>(uint32_t w) { return __uint_as_float(w << 16); }
template <> __device__ __forceinline__ float unpack_hi<at::BFloat16>(uint32_t w) {
  return __uint_as_float(w & 0xFFFF0000u);
}

// 16 bytes of T -> floats (4 for float32, 8 for 16-bit types), element order kept.
template <typename T> constexpr int kPerVec = 16 / static_cast<int>(sizeof(T));
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (sizeof(T) == 4) {
      out[k] = __uint_as_float(w[k]);
    } else {
      out[2 * k] = unpack_lo<T>(w[k]);
      out[2 * k + 1] = unpack_hi<T>(w[k]);
    }
  }
}
// kPerVec<T> floats -> 16 bytes of T (round to nearest even).
template <typename T>
__device__ __forceinline__ uint4 pack16(const float* in) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (sizeof(T) == 4) {
      w[k] = __float_as_uint(in[k]);
    } else {
      w[k] = pack2<T>(in[2 * k], in[2 * k + 1]);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---------------------------------------------------------------------------------------------
// NaN-aware float helpers (torch semantics: amax and clamp propagate NaN).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
// torch.clamp(x, lo, hi): NaN stays NaN.
__device__ __forceinline__ float clamp_nan(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
// torch.clamp(x, min=lo): NaN stays NaN.
__device__ __forceinline__ float clamp_min_nan(float x, float lo) { return x < lo ? lo : x; }

// ---------------------------------------------------------------------------------------------
// 16-byte vector memory helpers. Streaming input is read once: load it evict-first so it does not
// push reused data out of L2. Outputs are stored plainly: on the H200 evict-first (.cs) stores made
// a write-heavy stream ~5% slower (dequantize 0.1605 -> 0.1534 ms with plain stores, 470 MB written).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint4 load16_stream(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void store16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------------------------------------
// Launch geometry
// ---------------------------------------------------------------------------------------------
// A grid-stride grid: enough CTAs to fill every SM `per_sm` times, never more than the work.
inline int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}
inline int64_t persistent_grid(int64_t work_items, int per_sm) {
  const int sms = sm_count();
  return std::max<int64_t>(1, std::min<int64_t>(work_items, static_cast<int64_t>(sms) * per_sm));
}
// One CTA per work item (a streaming kernel's warps each take one tile and exit): on the H200 this
// beat a resident grid striding over the tiles by ~4% (the last round of a resident grid leaves
// SMs idle, while the hardware refills SMs CTA by CTA). Capped at the grid limit; kernels still
// stride, so a capped grid covers everything.
inline int64_t full_grid(int64_t work_items) {
  return std::max<int64_t>(1, std::min<int64_t>(work_items, int64_t{0x7FFFFFFF}));
}
// As many CTAs of `kernel` as fit on the device at once (occupancy API), never more than the work.
template <typename Kernel>
int64_t resident_grid(Kernel kernel, int threads, int64_t work_items) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return persistent_grid(work_items, std::max(per_sm, 1));
}

}  // namespace cuda
}  // namespace nf4kit
