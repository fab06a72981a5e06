// Shared by the CPU (.cpp) and CUDA (.cu) kernels: the code tables, nibble packing,
// the quantize decision, input-check helpers and dtype / quant_type switches.
// Every rule here is the bitsandbytes 0.50.2 CPU format (see nf4kit/reference.py, the spec).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include <cmath>

#include <ATen/ATen.h>
#include <torch/types.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NF4KIT_HD __host__ __device__ __forceinline__
#else
#define NF4KIT_HD inline
#endif

namespace nf4kit {

enum class QuantType : int { FP4 = 0, NF4 = 1 };

// NF4 code, index 0..15 (float32 values of bitsandbytes.functional.get_4bit_type("nf4")).
#define NF4KIT_NF4_CODE                                                                     \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,               \
   -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,               \
   0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,  \
   0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}

// FP4 code, index 0..15: {0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...} / 12 in float32 (bit 3 = sign).
#define NF4KIT_FP4_CODE                                                                      \
  {0.0f / 12.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f,   \
   2.0f / 12.0f, 3.0f / 12.0f, -0.0f / 12.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f, \
   -4.0f / 12.0f, -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f}

// Code indices in ascending value order (torch.argsort of the code on the CPU; NF4 is sorted).
#define NF4KIT_FP4_ORDER {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3}

// The smallest absmax a partial last block divides by (bitsandbytes clamps with 1e-38).
constexpr float kTinyAbsmax = 1e-38f;
constexpr int kNestedBlocksize = 256;

inline QuantType parse_quant_type(const std::string& s) {
  TORCH_CHECK_VALUE(s == "nf4" || s == "fp4", "quant_type must be 'nf4' or 'fp4', got '", s, "'");
  return s == "nf4" ? QuantType::NF4 : QuantType::FP4;
}

inline bool valid_blocksize_4bit(int64_t b) {
  return b == 32 || b == 64 || b == 128 || b == 256 || b == 512 || b == 1024 || b == 2048 || b == 4096;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Position of y among the 15 sorted midpoints: the number of midpoints strictly below y
// (torch.bucketize, right=False). NaN lands past every midpoint (15).
NF4KIT_HD int bucket15(float y, const float* mids) {
  int i = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) i += !(y <= mids[k]);
  return i;
}

// Every op allocates its outputs here. With NF4KIT_POISON=1 (the test suite sets it) they are
// filled with a value no kernel writes on purpose (NaN, 0xA5 bytes), so an element a kernel
// forgets to write shows up in the comparison instead of passing as a lucky zero.
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  static const bool poison = [] {
    const char* v = std::getenv("NF4KIT_POISON");
    return v != nullptr && v[0] == '1';
  }();
  if (!poison) return at::empty(shape, opts);
  if (at::isFloatingType(opts.dtype().toScalarType())) return at::full(shape, NAN, opts);
  return at::empty(shape, opts).fill_(0xA5 & (opts.dtype() == at::kByte ? 0xFF : 0x7F));
}

}  // namespace nf4kit

// Dispatch on the floating input/output dtype: scalar_t is float, at::Half or at::BFloat16.
#define NF4KIT_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)
