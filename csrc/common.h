// Shared by the CPU (.cpp) and CUDA (.cu) kernels: the code tables, nibble packing,
// the quantize decision, input-check helpers and dtype / quant_type switches.
// Every rule here is the bitsandbytes 0.50.2 CPU format (see nf4kit/reference.py, the spec).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include <cmath>

#include <ATen/ATen.h>
#include <torch/types.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NF4KIT_HD __host__ __device__ __forceinline__
#define NF4KIT_UNROLL _Pragma("unroll")
#else
#define NF4KIT_HD inline
#define NF4KIT_UNROLL _Pragma("GCC unroll 16")
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

// Position of y among the 15 sorted midpoints: the number of midpoints strictly below y
// (torch.bucketize, right=False). NaN lands past every midpoint (15).
NF4KIT_HD int bucket15(float y, const float* mids) {
  int i = 0;
  NF4KIT_UNROLL
  for (int k = 0; k < 15; ++k) i += !(y <= mids[k]);
  return i;
}

// The 8-bit quantizer snaps a scaled value to grid point i of 65536 over [-1, 1],
// g_i = i / 65535 * 2 - 1 (float32 steps), and reads the index of the code value nearest to g_i:
// the lower bound in the sorted 256-value code, then its right neighbour only when strictly
// closer (nf4kit/reference.py, _lut_8bit). Both backends build their 65536-entry table with this.
NF4KIT_HD uint8_t nearest_code_index(int i, const float* code) {
#ifdef __CUDA_ARCH__
  const float g = __fsub_rn(__fmul_rn(__fdiv_rn(static_cast<float>(i), 65535.0f), 2.0f), 1.0f);
#else
  const float g = static_cast<float>(i) / 65535.0f * 2.0f - 1.0f;
#endif
  int lo = 0, len = 256;  // std::lower_bound
  while (len > 0) {
    const int half = len / 2;
    if (code[lo + half] < g) {
      lo += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  if (lo == 0) return 0;
  if (lo == 256) return 255;
  const float dist_left = fabsf(g - code[lo - 1]);
  const float dist_right = fabsf(code[lo] - g);
  return static_cast<uint8_t>(dist_right < dist_left ? lo : lo - 1);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// "[d0, d1, ...]" built with std::to_string, not iostreams: an IntArrayRef streamed into an error
// message (c10::str) segfaulted in a _C built with the device image's /opt/gcc g++ (its libstdc++
// pieces end up inside _C); the device scripts now build with the system gcc, and messages stay
// iostream-free anyway.
inline std::string dims_string(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Everything quantizing and dequantizing need from one 4-bit code, built on the host and passed
// to kernels by value (a plain struct, no host-only members).
struct Code4Tables {
  float code[16];     // index order, as stored in quant_map
  float decode[16];   // what dequantize multiplies by: the code with -0.0 read as +0.0
  float mids[15];     // float32 means of neighbouring sorted code values
  uint8_t order[16];  // code index at each sorted position
  uint8_t zero_code;  // code index 0.0 quantizes to (an odd count's trailing low nibble)
};

inline Code4Tables make_code4_tables(QuantType qt) {
  static const float nf4[16] = NF4KIT_NF4_CODE;
  static const float fp4[16] = NF4KIT_FP4_CODE;
  static const uint8_t fp4_order[16] = NF4KIT_FP4_ORDER;
  Code4Tables t;
  for (int i = 0; i < 16; ++i) {
    t.code[i] = qt == QuantType::NF4 ? nf4[i] : fp4[i];
    t.decode[i] = t.code[i] == 0.0f ? 0.0f : t.code[i];
    t.order[i] = qt == QuantType::NF4 ? static_cast<uint8_t>(i) : fp4_order[i];
  }
  for (int k = 0; k < 15; ++k) t.mids[k] = (t.code[t.order[k]] + t.code[t.order[k + 1]]) / 2.0f;
  t.zero_code = t.order[bucket15(0.0f, t.mids)];
  return t;
}


// Host-side argument checks shared by the CPU and CUDA host functions. Each message names the
// argument, so the Python caller sees which one is wrong.
inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name, " must be float16, bfloat16 or float32, got ",
                   t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_numel(const at::Tensor& t, int64_t want, const char* name, const char* why) {
  TORCH_CHECK_VALUE(t.numel() == want, name, " has ", t.numel(), " elements, expected ", want, " (", why, ")");
}

inline void check_device(const at::Tensor& t, const at::Device& want, const char* name) {
  TORCH_CHECK_VALUE(t.device() == want, name, " is on ", t.device(), " but must be on ", want,
                    " with the other inputs");
}

// quantize_4bit's optional NaN/Inf flag: int32, at least one element (its device is checked per backend).
inline void check_nonfinite_flag(const at::Tensor& flag) {
  check_dtype(flag, at::kInt, "nonfinite");
  TORCH_CHECK_VALUE(flag.numel() >= 1, "nonfinite must hold at least one element, got shape ", flag.sizes());
}

inline void check_blocksize_4bit(int64_t blocksize) {
  TORCH_CHECK_VALUE(valid_blocksize_4bit(blocksize),
                    "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ", blocksize);
}

// The element count of an output shape (every dimension >= 0).
inline int64_t shape_numel(at::IntArrayRef shape, const char* name) {
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, name, " must not have negative dimensions, got ", shape);
    n *= d;
  }
  return n;
}

// A packed 4-bit tensor of n elements and its absmax (float32, or nested: uint8 codes decoded with
// nested_absmax, nested_code and offset), checked and made contiguous: what dequantize_4bit and
// gemm_4bit read, with the same rules and messages on every backend. `what` names the tensor in
// messages, e.g. "shape [3, 70]".
struct Packed4bit {
  at::Tensor packed;                              // flat uint8 bytes, at least (n + 1) / 2
  at::Tensor absmax;                              // float32 [nblocks], or uint8 codes when nested
  at::Tensor nested_absmax, nested_code, offset;  // float32, defined when nested
  bool nested = false;
  QuantType qt = QuantType::NF4;
  int64_t n = 0, nblocks = 0, blocksize = 64, nested_blocksize = 256;
};

inline Packed4bit check_packed_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                                    const c10::optional<at::Tensor>& nested_absmax,
                                    const c10::optional<at::Tensor>& nested_code,
                                    const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                    int64_t nested_blocksize, c10::string_view quant_type, int64_t n,
                                    const std::string& what) {
  Packed4bit w;
  check_blocksize_4bit(blocksize);
  w.qt = parse_quant_type(std::string(quant_type));
  w.n = n;
  w.blocksize = blocksize;
  w.nested_blocksize = nested_blocksize;
  w.nblocks = ceil_div(n, blocksize);
  const at::Device dev = packed.device();
  const int64_t nbytes = packed.numel() * packed.element_size();
  TORCH_CHECK_VALUE(nbytes >= (n + 1) / 2, "packed holds ", nbytes, " bytes, too few for ", what, " (",
                    (n + 1) / 2, " needed)");
  const at::Tensor p = packed.contiguous().reshape({-1});
  w.packed = p.scalar_type() == at::kByte ? p : p.view(at::kByte);
  check_device(absmax, dev, "absmax");
  check_numel(absmax, w.nblocks, "absmax", ("one per block of blocksize in " + what).c_str());
  w.absmax = absmax.contiguous();
  if (w.absmax.scalar_type() == at::kByte) {
    TORCH_CHECK_VALUE(nested_absmax.has_value() && nested_code.has_value() && offset.has_value(),
                      "absmax is uint8 (nested) so nested_absmax, nested_code and offset are required");
    TORCH_CHECK_VALUE(nested_blocksize > 0, "nested_blocksize must be positive, got ", nested_blocksize);
    const std::pair<const at::Tensor*, const char*> parts[] = {
        {&*nested_absmax, "nested_absmax"}, {&*nested_code, "nested_code"}, {&*offset, "offset"}};
    for (const auto& part : parts) {
      check_dtype(*part.first, at::kFloat, part.second);
      check_device(*part.first, dev, part.second);
    }
    check_numel(*nested_absmax, ceil_div(w.nblocks, nested_blocksize), "nested_absmax",
                "one per nested_blocksize absmax codes");
    check_numel(*nested_code, 256, "nested_code", "the 8-bit code");
    check_numel(*offset, 1, "offset", "a scalar");
    w.nested = true;
    w.nested_absmax = nested_absmax->contiguous();
    w.nested_code = nested_code->contiguous();
    w.offset = offset->contiguous();
  } else {
    TORCH_CHECK_TYPE(w.absmax.scalar_type() == at::kFloat,
                     "absmax must be float32, or uint8 codes with nested_absmax, got ", w.absmax.scalar_type());
    TORCH_CHECK_VALUE(!nested_absmax.has_value() && !nested_code.has_value() && !offset.has_value(),
                      "nested_absmax, nested_code and offset are only for uint8 (nested) absmax; absmax is float32");
  }
  return w;
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

// Dispatch on the floating input/output dtype: scalar_t is float, at::Half or at::BFloat16 (no
// double: every op rejects it, so no kernel is compiled for it).
#define NF4KIT_DISPATCH_FLOAT(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
