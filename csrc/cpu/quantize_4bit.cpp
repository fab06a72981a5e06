// CPU kernels of the blockwise 4-bit ops (NF4 / FP4): quantize_4bit and dequantize_4bit.
// Bit for bit nf4kit/reference.py (bitsandbytes 0.50.2's CPU format); see the comments there.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../common.h"
#include "cpu_common.h"

namespace nf4kit {
namespace {

using cpu::block_absmax;
using cpu::clamp_unit;

// torch.clamp(v, min=lo): NaN stays NaN.
NF4KIT_ALWAYS_INLINE float clamp_min(float v, float lo) { return v < lo ? lo : v; }

// Sorted-code position (bucket) of each value of one block: y = x * recip (full block) or
// x / divisor (partial last block), clamped to [-1, 1], among the 15 sorted midpoints. The block
// is first widened to float32 in its own loop so that both loops vectorize.
template <typename scalar_t, bool kPartial>
NF4KIT_ALWAYS_INLINE void block_buckets(const scalar_t* x, int64_t len, float scale, const float* mids_,
                                        uint8_t* q) {
  float v[4096];
  for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(x[i]);
  float mids[15];
  std::copy(mids_, mids_ + 15, mids);
  for (int64_t i = 0; i < len; ++i) {
    const float y = clamp_unit(kPartial ? v[i] / scale : v[i] * scale);
    q[i] = static_cast<uint8_t>(bucket15(y, mids));
  }
}

// The packed byte of each pair of buckets: code index order[hi] << 4 | order[lo] (identity for
// NF4, whose code is sorted).
struct PairTable {
  uint8_t byte[256];
  explicit PairTable(const Code4Tables& t) {
    for (int k = 0; k < 256; ++k) byte[k] = static_cast<uint8_t>((t.order[k >> 4] << 4) | t.order[k & 15]);
  }
};

template <typename scalar_t>
struct QuantizeJob {
  const scalar_t* x;
  int64_t n, blocksize;
  uint8_t* packed;
  float* absmax;
  const Code4Tables* t;
  const PairTable* pairs_of;
  uint8_t zero_bucket;  // the bucket of 0.0, which a trailing odd element pairs with
};

// Blocks [b0, b1) of one quantize_4bit call.
template <typename scalar_t, QuantType QT>
NF4KIT_ALWAYS_INLINE void quantize_blocks(const QuantizeJob<scalar_t>& j, int64_t b0, int64_t b1) {
  uint8_t q[4096];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.blocksize;
    const int64_t len = std::min(j.blocksize, j.n - start);
    const scalar_t* x = j.x + start;
    const float am = block_absmax(x, len);
    if (len == j.blocksize) {
      j.absmax[b] = am;
      block_buckets<scalar_t, false>(x, len, 1.0f / clamp_min(am, kTinyAbsmax), j.t->mids, q);
    } else {
      const float divisor = clamp_min(am, kTinyAbsmax);
      j.absmax[b] = divisor;
      block_buckets<scalar_t, true>(x, len, divisor, j.t->mids, q);
    }
    // blocksize is even, so a block starts on a byte; only the very last one can be odd.
    uint8_t* out = j.packed + start / 2;
    const int64_t pairs = len / 2;
    for (int64_t i = 0; i < pairs; ++i) {
      const uint8_t bb = static_cast<uint8_t>((q[2 * i] << 4) | q[2 * i + 1]);
      out[i] = QT == QuantType::NF4 ? bb : j.pairs_of->byte[bb];
    }
    if (len % 2) out[pairs] = j.pairs_of->byte[(q[len - 1] << 4) | j.zero_bucket];
  }
}

// The same loop compiled for the baseline ISA and for AVX2 (wider vectors, F16C widening).
template <typename scalar_t, QuantType QT>
void quantize_blocks_base(const QuantizeJob<scalar_t>& j, int64_t b0, int64_t b1) {
  quantize_blocks<scalar_t, QT>(j, b0, b1);
}
template <typename scalar_t, QuantType QT>
NF4KIT_TARGET_AVX2 void quantize_blocks_avx2(const QuantizeJob<scalar_t>& j, int64_t b0, int64_t b1) {
  quantize_blocks<scalar_t, QT>(j, b0, b1);
}

template <typename scalar_t, QuantType QT>
void quantize_4bit_cpu_kernel(const scalar_t* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  const Code4Tables t = make_code4_tables(QT);
  const PairTable pairs_of(t);
  const QuantizeJob<scalar_t> job{x, n, blocksize, packed, absmax, &t, &pairs_of,
                                  static_cast<uint8_t>(bucket15(0.0f, t.mids))};
  const auto fn = cpu::use_avx2() ? &quantize_blocks_avx2<scalar_t, QT> : &quantize_blocks_base<scalar_t, QT>;
  at::parallel_for(0, ceil_div(n, blocksize), cpu::grain_blocks(blocksize),
                   [&](int64_t b0, int64_t b1) { fn(job, b0, b1); });
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A_, int64_t blocksize,
                                                     c10::string_view quant_type,
                                                     const c10::optional<at::Tensor>& nonfinite) {
  check_float_input(A_, "A");
  TORCH_CHECK_VALUE(A_.numel() > 0, "A must not be empty, got shape ", A_.sizes());
  check_blocksize_4bit(blocksize);
  if (nonfinite) {
    check_nonfinite_flag(*nonfinite);
    check_device(*nonfinite, A_.device(), "nonfinite");
  }
  const QuantType qt = parse_quant_type(std::string(quant_type));
  const at::Tensor A = A_.contiguous();
  const int64_t n = A.numel();
  at::Tensor packed = new_output({(n + 1) / 2}, A.options().dtype(at::kByte));
  at::Tensor absmax = new_output({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  NF4KIT_DISPATCH_FLOAT(A.scalar_type(), "quantize_4bit_cpu", [&] {
    auto run = [&](auto qt_tag) {
      quantize_4bit_cpu_kernel<scalar_t, decltype(qt_tag)::value>(
          A.data_ptr<scalar_t>(), n, blocksize, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
    };
    if (qt == QuantType::NF4) run(std::integral_constant<QuantType, QuantType::NF4>{});
    else run(std::integral_constant<QuantType, QuantType::FP4>{});
  });
  if (nonfinite) {  // every absmax is >= 0 or NaN: not <= FLT_MAX means NaN or inf
    const float* a = absmax.data_ptr<float>();
    for (int64_t i = 0; i < absmax.numel(); ++i)
      if (!(a[i] <= std::numeric_limits<float>::max())) {
        nonfinite->data_ptr<int32_t>()[0] = 1;
        break;
      }
  }
  return {packed, absmax};
}

// Where the kernel reads each block's absmax: float32 values, or (nested) uint8 codes decoded as
// code8[q] * nested_absmax[j / nested_blocksize], then + offset (two float32 roundings).
struct AbsmaxSource {
  const float* absmax = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
  int64_t nested_blocksize = 1;

  NF4KIT_ALWAYS_INLINE float operator()(int64_t j) const {
    if (absmax != nullptr) return absmax[j];
    const float scaled = nested_code[absmax_q[j]] * nested_absmax[j / nested_blocksize];
    return scaled + offset;
  }
};

// The 16 values of one block, code * absmax in float32, rounded to the output type.
template <typename out_t>
NF4KIT_ALWAYS_INLINE void block_table(const float* decode, float s, out_t* table) {
  for (int k = 0; k < 16; ++k) table[k] = static_cast<out_t>(decode[k] * s);
}

// Output elements 2i and 2i+1 from the high and low nibble of byte i.
template <typename out_t>
NF4KIT_ALWAYS_INLINE void expand_nibbles(const uint8_t* in, int64_t i0, int64_t i1, const out_t* table, out_t* o) {
  for (int64_t i = i0; i < i1; ++i) {
    o[2 * i] = table[in[i] >> 4];
    o[2 * i + 1] = table[in[i] & 0xF];
  }
}

#if NF4KIT_X86_AVX2
// F16C rounds to nearest even, as c10::Half does (NaN stays NaN, its payload may differ).
NF4KIT_TARGET_AVX2 inline void block_table_f16c(const float* decode, float s, c10::Half* table) {
  const __m256 sv = _mm256_set1_ps(s);
  const __m256 p0 = _mm256_mul_ps(_mm256_loadu_ps(decode), sv);
  const __m256 p1 = _mm256_mul_ps(_mm256_loadu_ps(decode + 8), sv);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(table), _mm256_cvtps_ph(p0, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(table + 8), _mm256_cvtps_ph(p1, _MM_FROUND_TO_NEAREST_INT));
}

// The code indices of 16 packed bytes in element order: lane 0 holds elements 0..15, lane 1 16..31.
NF4KIT_TARGET_AVX2 inline __m256i nibble_indices(const uint8_t* in) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m128i lo = _mm_and_si128(b, mask);
  return _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
}

// 2-byte outputs: two byte shuffles (low and high bytes of the 16 table values) per 32 elements.
// Returns how many bytes it expanded (a multiple of 16).
NF4KIT_TARGET_AVX2 inline int64_t expand_nibbles_avx2(const uint8_t* in, int64_t nbytes,
                                                                    const uint16_t* table, uint16_t* o) {
  alignas(16) uint8_t lo_bytes[16], hi_bytes[16];
  for (int k = 0; k < 16; ++k) {
    lo_bytes[k] = static_cast<uint8_t>(table[k] & 0xFF);
    hi_bytes[k] = static_cast<uint8_t>(table[k] >> 8);
  }
  const __m256i tlo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo_bytes)));
  const __m256i thi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi_bytes)));
  int64_t i = 0;
  for (; i + 16 <= nbytes; i += 16) {
    const __m256i idx = nibble_indices(in + i);
    const __m256i vlo = _mm256_shuffle_epi8(tlo, idx);
    const __m256i vhi = _mm256_shuffle_epi8(thi, idx);
    const __m256i a = _mm256_unpacklo_epi8(vlo, vhi);  // elements 0..7 | 16..23
    const __m256i c = _mm256_unpackhi_epi8(vlo, vhi);  // elements 8..15 | 24..31
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 2 * i), _mm256_permute2x128_si256(a, c, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 2 * i + 16), _mm256_permute2x128_si256(a, c, 0x31));
  }
  return i;
}

// float32 outputs: two 8-entry permutes and a blend on index bit 3 per 8 elements.
NF4KIT_TARGET_AVX2 inline int64_t expand_nibbles_avx2(const uint8_t* in, int64_t nbytes,
                                                                    const float* table, float* o) {
  const __m256 t0 = _mm256_loadu_ps(table);
  const __m256 t1 = _mm256_loadu_ps(table + 8);
  int64_t i = 0;
  for (; i + 16 <= nbytes; i += 16) {
    const __m256i idx = nibble_indices(in + i);
    const __m128i halves[2] = {_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1)};
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 2; ++k) {
        const __m256i i32 = _mm256_cvtepu8_epi32(k == 0 ? halves[h] : _mm_srli_si128(halves[h], 8));
        const __m256 v0 = _mm256_permutevar8x32_ps(t0, i32);
        const __m256 v1 = _mm256_permutevar8x32_ps(t1, i32);
        const __m256 pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32(i32, 28));  // sign bit = index bit 3
        _mm256_storeu_ps(o + 2 * i + 16 * h + 8 * k, _mm256_blendv_ps(v0, v1, pick_hi));
      }
    }
  }
  return i;
}
#endif

template <typename out_t>
struct DequantizeJob {
  const uint8_t* packed;
  AbsmaxSource absmax;
  int64_t n, blocksize;
  const float* decode;
  out_t* out;
};

// Blocks [b0, b1) of one dequantize_4bit call.
template <typename out_t, bool kAvx2>
NF4KIT_ALWAYS_INLINE void dequantize_blocks(const DequantizeJob<out_t>& j, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.blocksize;
    const int64_t len = std::min(j.blocksize, j.n - start);
    const float s = j.absmax(b);
    alignas(32) out_t table[16];
    const uint8_t* in = j.packed + start / 2;
    out_t* o = j.out + start;
    const int64_t pairs = len / 2;
    int64_t done = 0;
#if NF4KIT_X86_AVX2
    if constexpr (kAvx2) {
      if constexpr (std::is_same_v<out_t, c10::Half>) block_table_f16c(j.decode, s, table);
      else block_table(j.decode, s, table);
      if constexpr (std::is_same_v<out_t, float>) {
        done = expand_nibbles_avx2(in, pairs, table, o);
      } else {
        done = expand_nibbles_avx2(in, pairs, reinterpret_cast<const uint16_t*>(table), reinterpret_cast<uint16_t*>(o));
      }
    } else {
      block_table(j.decode, s, table);
    }
#else
    block_table(j.decode, s, table);
#endif
    expand_nibbles(in, done, pairs, table, o);
    if (len % 2) o[len - 1] = table[in[pairs] >> 4];
  }
}

template <typename out_t>
void dequantize_blocks_base(const DequantizeJob<out_t>& j, int64_t b0, int64_t b1) {
  dequantize_blocks<out_t, false>(j, b0, b1);
}
template <typename out_t>
NF4KIT_TARGET_AVX2 void dequantize_blocks_avx2(const DequantizeJob<out_t>& j, int64_t b0, int64_t b1) {
  dequantize_blocks<out_t, true>(j, b0, b1);
}

template <typename out_t>
void dequantize_4bit_cpu_kernel(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                                int64_t blocksize, const Code4Tables& t, out_t* out) {
  const DequantizeJob<out_t> job{packed, absmax, n, blocksize, t.decode, out};
  const auto fn = cpu::use_avx2() ? &dequantize_blocks_avx2<out_t> : &dequantize_blocks_base<out_t>;
  at::parallel_for(0, ceil_div(n, blocksize), cpu::grain_blocks(blocksize),
                   [&](int64_t b0, int64_t b1) { fn(job, b0, b1); });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                               at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_float_dtype(dtype), "dtype must be float16, bfloat16 or float32, got ", dtype);
  const int64_t n = shape_numel(shape, "shape");
  const Packed4bit w = check_packed_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                         nested_blocksize, quant_type, n, c10::str("shape ", shape));
  AbsmaxSource src;
  if (w.nested) {
    src.absmax_q = w.absmax.data_ptr<uint8_t>();
    src.nested_absmax = w.nested_absmax.data_ptr<float>();
    src.nested_code = w.nested_code.data_ptr<float>();
    src.offset = w.offset.item<float>();
    src.nested_blocksize = nested_blocksize;
  } else {
    src.absmax = w.absmax.data_ptr<float>();
  }
  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  if (n == 0) return out;
  const Code4Tables t = make_code4_tables(w.qt);
  NF4KIT_DISPATCH_FLOAT(dtype, "dequantize_4bit_cpu", [&] {
    dequantize_4bit_cpu_kernel<scalar_t>(w.packed.data_ptr<uint8_t>(), src, n, blocksize, t, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nf4kit, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

}  // namespace nf4kit
